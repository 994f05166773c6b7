"""The controller killed half-way through a reparent, at every journaled phase of PRS and ERS.

Baton runs with a failpoint (reparent/failpoint.py) that ends the process like `kill -9` just
before a mechanism call (its step journaled, the call not made) or just after it (the call
made, its outcome not journaled). A fresh Baton on the same store must then resume or undo the
reparent, deterministically. Checked in every case, with writers going through Baton:
- while it all happens, never two servers writable at once (polled every few ms);
- afterwards: no reparent in flight, exactly one writable server, the one the store names,
  every other live server replicating from it, the term up by one if the reparent went
  through and unchanged if it was undone, writes through Baton landing on it;
- every write a client saw acknowledged is there (planned reparents: nothing may be lost);
- every client request ended, with a result or an error, none hung;
- how long from the crash until writes flow again.

`make test` runs three points; `make fault-test` (BATON_FAULT_SUITE=1) runs all of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_query
from harness.ledger import TABLE, Ledger, create_table
from reparent.failpoint import ENV, EXIT_CODE
from reparent.sandbox import Sandbox
from tests.fixtures import WritablePoller, port_hint, private_sandbox, server_ports

PRS_CALLS = ("choose", "prepare", "revoke", "establish", "commit")
ERS_CALLS = ("revoke", "choose", "establish", "commit")
# The short suite: a demotion half done, a promotion not yet published, an emergency fenced.
SHORT = {("prs", "before:revoke"), ("prs", "after:establish"), ("ers", "after:revoke")}
CONTROLLER = {"grace": 1.0, "timeout": 5.0, "max_lag": 2.0}


def points(kind: str, calls: tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(
            kind,
            f"{when}:{call}",
            marks=[] if (kind, f"{when}:{call}") in SHORT else [pytest.mark.fault],
            id=f"{kind}-{when}-{call}",
        )
        for call in calls
        for when in ("before", "after")
    ]


def status(b: Baton) -> dict[str, Any]:
    return json.loads(b.ctl("--json", "status").stdout)["shards"][0]


def crash_then_resume(
    box: Sandbox, workdir: Path, kind: str, point: str, hint: int
) -> dict[str, Any]:
    """Run `kind` with Baton set to die at `point` under writers, restart Baton on the same
    store, and return what the checks need."""
    store = box.dir / "crash-state.json"  # the sandbox's one truth across its cases
    common = {"controller": {**CONTROLLER, "store": str(store)}, "detector": {"enabled": False}}
    first = start_baton(box.config_path, workdir / "crash", hint, env={ENV: point}, **common)
    ledger: Ledger | None = None
    try:
        port = {"now": first.port}
        setup = first.connect()
        create_table(setup)
        setup.cursor().execute(f"TRUNCATE {TABLE}")  # each case's writers start their ids anew
        setup.close()
        before = status(first)

        def connect() -> pymysql.Connection:
            return pymysql.connect(
                host="127.0.0.1",
                port=port["now"],
                user="app",
                password="app-pass",
                autocommit=True,
                connect_timeout=2,
                read_timeout=30,
            )

        ledger = Ledger(connect, writers=2).start()
        time.sleep(0.3)
        if kind == "ers":
            # Replicas have what the dead primary acknowledged before it died: no errant rejoin.
            pid = next(s["pid"] for s in box.status()["servers"] if s["name"] == before["primary"])
            os.kill(pid, signal.SIGKILL)
        first.ctl("--json", kind)  # the controller dies under it: the reply is cut off
        try:
            code = first.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{point}: the failpoint was never reached")
        crashed_at = time.monotonic()
        assert code == EXIT_CODE, (code, first.log.read_text()[-2000:])
        second = start_baton(box.config_path, workdir / "resume", hint + 5, **common)
        port["now"] = second.port
        try:
            deadline = time.monotonic() + 30
            while (after := status(second))["reparent"] is not None:
                assert time.monotonic() < deadline, after
                time.sleep(0.05)
            flowing = None
            acked = ledger.count()
            while time.monotonic() < deadline:
                if ledger.count() > acked:
                    flowing = time.monotonic() - crashed_at
                    break
                time.sleep(0.01)
            ledger.halt()
            ledger.join()
            conn = second.connect()
            with conn.cursor() as cur:
                cur.execute("SELECT @@port")
                routed_port = cur.fetchone()[0]
            conn.close()
            history = json.loads(second.ctl("--json", "history", "--limit", "1").stdout)
            return {
                "before": before,
                "after": after,
                "ledger": ledger,
                "routed_port": routed_port,
                "flowing_s": flowing,
                "last": history[0] if history else None,
                "log": (workdir / "resume" / "baton.log").read_text()[-3000:],
            }
        finally:
            second.stop()
    finally:
        first.stop()  # nothing to do when the failpoint ended it
        if ledger is not None:
            ledger.halt()
            ledger.join()


def check(box: Sandbox, result: dict[str, Any], kind: str, point: str) -> None:
    before, after = result["before"], result["after"]
    ports = server_ports(box)
    live = {}
    for name, port in ports.items():
        try:
            live[name] = admin_query(port, "SELECT @@read_only AS ro")[0]["ro"]
        except pymysql.MySQLError:
            pass  # the primary ERS gave up on
    writable = [name for name, ro in live.items() if ro == 0]
    assert writable == [after["primary"]], (point, live, after, result["log"])
    assert result["routed_port"] == ports[after["primary"]]
    last = result["last"]
    moved = after["primary"] != before["primary"]
    assert after["term"] == before["term"] + (1 if moved else 0), (before, after, last)
    if kind == "prs" and point.split(":")[1] in ("choose", "prepare"):
        # Nothing is journaled before the hold: nothing to resume, and nothing moved.
        assert not moved, (before, after)
    else:
        assert last is not None and last["outcome"] is not None, result["log"]
        assert moved == (last["outcome"] == "succeeded"), last
    if kind == "ers":
        assert moved, f"{point}: an emergency reparent must roll forward: {last}"
    primary_port = ports[after["primary"]]
    for name in live:
        if name == after["primary"]:
            continue
        (row,) = admin_query(ports[name], "SHOW SLAVE STATUS")
        assert int(row["Master_Port"]) == primary_port, (name, row["Master_Port"])
        assert row["Slave_SQL_Running"] == "Yes", (name, row["Last_SQL_Error"])
    rows = admin_query(primary_port, f"SELECT id FROM {TABLE}")
    present = {r["id"] for r in rows}
    ledger = result["ledger"]
    if kind == "prs":
        assert ledger.acked <= present, sorted(ledger.acked - present)[:10]
    assert result["flowing_s"] is not None, "writes never flowed again"
    outcome = last["outcome"] if last else "nothing journaled"
    print(
        f"{kind} {point}: {outcome}, writes again {result['flowing_s']:.2f} s after the"
        f" crash, {len(ledger.acked)} acknowledged, {ledger.errors} client errors"
    )


@pytest.fixture(scope="module")
def prs_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "crash-sandbox")


@pytest.mark.parametrize(("kind", "point"), points("prs", PRS_CALLS))
def test_controller_killed_during_prs(prs_box: Sandbox, tmp_path: Path, kind: str, point: str):
    with WritablePoller(server_ports(prs_box)) as poller:
        result = crash_then_resume(prs_box, tmp_path, kind, point, port_hint() + 130)
    assert not poller.overlaps, poller.overlaps[:5]
    check(prs_box, result, kind, point)


@pytest.mark.parametrize(("kind", "point"), points("ers", ERS_CALLS))
def test_controller_killed_during_ers(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, kind: str, point: str
):
    # Each emergency loses a server for good: a sandbox of its own.
    with contextmanager(private_sandbox)(tmp_path_factory, "crash-ers-sandbox") as box:
        with WritablePoller(server_ports(box)) as poller:
            result = crash_then_resume(box, tmp_path, kind, point, port_hint() + 140)
        assert not poller.overlaps, poller.overlaps[:5]
        check(box, result, kind, point)
