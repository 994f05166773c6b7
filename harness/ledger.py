"""A client-side ledger of acknowledged writes, and the kill -9 / ERS scenario that checks it.

Each writer inserts ids of its own, one autocommit INSERT at a time, through Baton, and records
an id only when its COMMIT was acknowledged (the OK arrived). An error means "not acknowledged"
(Baton's 1927 for a write in flight may or may not have committed: such an id may turn up, but
it is not owed). After the primary dies and an emergency reparent promotes a replica, every
recorded id must be on the new primary; the ones missing are acknowledged writes lost. Used by
tests/test_durability.py, tests/test_crash.py and bench/durability.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pymysql

TABLE = "baton_ledger.acked"
ID_STRIDE = 10_000_000  # writer w writes ids (w + 1) * ID_STRIDE + 1, + 2, ...


class Ledger:
    """`writers` threads inserting through `connect()` until `stop()`; `acked` holds the ids
    whose COMMIT was acknowledged, `acks` when each of them was sent and when its OK arrived,
    and `error_log` when each error arrived, with its text (time.monotonic(), every writer's
    in one list). Ledgers that write one table at once number their writers apart (`first`).
    """

    def __init__(
        self, connect: Callable[[], pymysql.Connection], writers: int = 4, first: int = 0
    ) -> None:
        self.connect = connect
        self.acked: set[int] = set()
        self.errors = 0
        self.acks: list[tuple[float, float]] = []  # (sent, acknowledged)
        self.error_log: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._write, args=(first + w,), daemon=True)
            for w in range(writers)
        ]

    def start(self) -> Ledger:
        for t in self._threads:
            t.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def halt(self) -> None:
        """Each writer ends after its current command (which Baton may hold until the next
        primary is established: hence halt, reparent, then join)."""
        self._stop.set()

    def join(self) -> None:
        for t in self._threads:
            t.join(20)

    def _write(self, writer: int) -> None:
        next_id = (writer + 1) * ID_STRIDE
        conn: pymysql.Connection | None = None
        while not self._stop.is_set():
            next_id += 1
            try:
                if conn is None:
                    conn = self.connect()
                sent_at = time.monotonic()
                with conn.cursor() as cur:
                    cur.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (next_id,))
            except pymysql.err.Error as e:
                with self._lock:
                    self.errors += 1
                    self.error_log.append((time.monotonic(), str(e)[:200]))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
                continue
            acked_at = time.monotonic()
            with self._lock:
                self.acked.add(next_id)
                self.acks.append((sent_at, acked_at))
        if conn is not None:
            conn.close()


@dataclass
class Outcome:
    durability: str
    acked: int
    lost: list[int]
    errors: int
    old_primary: str
    new_primary: str
    ers: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "durability": self.durability,
            "acked": self.acked,
            "lost": len(self.lost),
            "lost_ids": self.lost[:20],
            "client_errors": self.errors,
            "old_primary": self.old_primary,
            "new_primary": self.new_primary,
        }


def create_table(conn: pymysql.Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS baton_ledger")
        cur.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT PRIMARY KEY)")


def kill_primary_then_ers(
    connect: Callable[[], pymysql.Connection],
    ctl: Callable[..., subprocess.CompletedProcess[str]],
    pids: dict[str, int],
    primary: str,
    read_ids: Callable[[str], set[int]],
    durability: str,
    load_seconds: float = 1.0,
    writers: int = 4,
    min_acked: int = 0,
) -> Outcome:
    """Write for `load_seconds` and until `min_acked` writes were acknowledged (a loaded
    machine may start the writers late), kill -9 `primary` mid-load, let the writers fail for
    a moment, halt them, run `baton ctl ers`, and compare the ledger with the new primary's
    rows (`read_ids(server name)`)."""
    ledger = Ledger(connect, writers).start()
    time.sleep(load_seconds)
    deadline = time.monotonic() + 20
    while ledger.count() < min_acked and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pids[primary], signal.SIGKILL)
    time.sleep(0.2)
    ledger.halt()
    out = ctl("--json", "ers")
    ledger.join()
    try:
        report = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"ers failed: {out.stdout}{out.stderr}") from None
    if out.returncode != 0 or report.get("outcome") != "succeeded":
        raise AssertionError(f"ers failed: {report}")
    new = report["new_primary"]
    present = read_ids(new)
    return Outcome(
        durability=durability,
        acked=len(ledger.acked),
        lost=sorted(ledger.acked - present),
        errors=ledger.errors,
        old_primary=primary,
        new_primary=new,
        ers=report,
    )
