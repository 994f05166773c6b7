"""The unplanned path: a command that fails on the primary before any of its result reached the
client waits (once) for the next primary instead of failing, unless the failure was its own."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_query
from reparent.sandbox import Sandbox
from tests.fixtures import metric, port_hint, private_sandbox, server_ports

WINDOW = 3.0  # seconds a held command waits: short, so giving up is quick to see


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "unplanned-sandbox")


@pytest.fixture(scope="module")
def ubaton(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(
        box.config_path,
        tmp_path_factory.mktemp("unplanned-baton"),
        port_hint() + 100,
        controller={"grace": 1.0},
        detector={"enabled": False},  # these tests fail the primary and switch by hand
        buffer={"window": WINDOW, "max_failover": 2 * WINDOW},
    )
    try:
        conn = b.connect()
        conn.cursor().execute("CREATE DATABASE IF NOT EXISTS baton_unplanned")
        conn.cursor().execute(
            "CREATE TABLE IF NOT EXISTS baton_unplanned.t"
            " (id INT AUTO_INCREMENT PRIMARY KEY, v INT)"
        )
        conn.close()
        yield b
    finally:
        b.stop()


@dataclass
class Outcome:
    elapsed: float = 0.0
    error: pymysql.MySQLError | None = None
    rows: Any = None


def in_thread(conn: pymysql.Connection, sql: str) -> tuple[threading.Thread, Outcome]:
    """Run `sql` on `conn` in a thread; the outcome says how long it took and how it ended."""
    out = Outcome()

    def run() -> None:
        start = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                out.rows = cur.fetchall()
        except pymysql.MySQLError as e:
            out.error = e
        out.elapsed = time.monotonic() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def primary(b: Baton) -> str:
    return json.loads(b.ctl("--json", "status").stdout)["shards"][0]["primary"]


@contextmanager
def read_only(box: Sandbox, server: str) -> Iterator[None]:
    """`server` read_only while the block runs, as an operator or another controller would."""
    port = server_ports(box)[server]
    admin_query(port, "SET GLOBAL read_only = 1")
    try:
        yield
    finally:
        admin_query(port, "SET GLOBAL read_only = 0")


def count(box: Sandbox, server: str, v: int) -> int:
    port = server_ports(box)[server]
    rows = admin_query(port, f"SELECT COUNT(*) AS n FROM baton_unplanned.t WHERE v={v}")
    return int(rows[0]["n"])


def test_a_write_refused_as_read_only_waits_for_the_switch_and_runs_once(box, ubaton):
    """The primary turned read_only under a session (another controller, an operator): the
    server's 1290 is not relayed; the insert waits and runs on the primary published next."""
    old = primary(ubaton)
    conn = ubaton.connect()
    admin_query(server_ports(box)[old], "SET GLOBAL read_only = 1")
    t, out = in_thread(conn, "INSERT INTO baton_unplanned.t (v) VALUES (1)")
    time.sleep(0.5)
    assert t.is_alive(), f"not held: {out}"
    result = ubaton.ctl("--json", "prs")
    assert result.returncode == 0, result.stderr
    t.join(10)
    assert out.error is None and not t.is_alive(), out
    # The report counts what this Baton held for the switch, and the history keeps it.
    report = json.loads(result.stdout)
    assert report["held"] >= 1 and report["flushed"] == report["held"], report
    (last,) = json.loads(ubaton.ctl("--json", "history", "--limit", "1").stdout)
    assert (last["id"], last["held"], last["flushed"]) == (
        report["id"],
        report["held"],
        report["flushed"],
    )
    new = primary(ubaton)
    assert new != old
    assert count(box, new, 1) == 1
    assert (
        metric(ubaton.scrape(), "baton_failed_commands_total", cause="read_only", outcome="held")
        >= 1
    )
    conn.close()


def test_read_only_with_no_switch_gives_the_servers_own_error_after_the_window(box, ubaton):
    current = primary(ubaton)
    conn = ubaton.connect()
    with read_only(box, current):
        t, out = in_thread(conn, "INSERT INTO baton_unplanned.t (v) VALUES (2)")
        t.join(3 * WINDOW)
    assert isinstance(out.error, pymysql.err.OperationalError | pymysql.err.InternalError), out
    assert out.error.args[0] == 1290, out.error  # the server's error, unchanged
    assert WINDOW - 0.5 < out.elapsed < 2 * WINDOW, out.elapsed
    assert count(box, current, 2) == 0
    conn.close()


def test_a_write_refused_as_read_only_runs_once_the_primary_takes_writes_again(box, ubaton):
    """read_only lifted with no reparent (an operator, or the detector's repair): the waiting
    insert goes back to the same primary, which never ran it."""
    current = primary(ubaton)
    conn = ubaton.connect()
    with read_only(box, current):
        t, out = in_thread(conn, "INSERT INTO baton_unplanned.t (v) VALUES (4)")
        time.sleep(1.0)
        assert t.is_alive(), f"not held: {out}"
    t.join(WINDOW)
    assert out.error is None and not t.is_alive(), out
    assert out.elapsed < WINDOW, out.elapsed
    assert count(box, current, 4) == 1
    conn.close()


def test_a_connection_killed_on_a_healthy_primary_fails_at_once(box, ubaton):
    """A KILL of one backend connection is that session's failure, not the primary's: the
    client hears of it at once instead of waiting for a switch that is not coming, and the
    session ends, as direct."""
    current = primary(ubaton)
    port = server_ports(box)[current]
    conn = ubaton.connect()
    t, out = in_thread(conn, "SELECT SLEEP(5) AS unplanned_kill_me")
    deadline = time.monotonic() + 5
    while True:
        rows = admin_query(
            port,
            "SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '%unplanned_kill_me%'"
            " AND INFO NOT LIKE '%PROCESSLIST%'",
        )
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows, "the statement never reached the primary"
    admin_query(port, f"KILL CONNECTION {rows[0]['ID']}")
    t.join(10)
    assert out.error is not None and out.elapsed < 2.0, out
    # The server ended the session, as it would direct: the next statement fails too, and
    # a new session works.
    with pytest.raises(pymysql.err.OperationalError) as exc, conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert exc.value.args[0] in (2006, 2013)
    conn.close()
    fresh = ubaton.connect()
    fresh.cursor().execute("SELECT 1")
    fresh.close()


def test_sessions_whose_state_cannot_move_are_refused_naming_it(box, ubaton):
    """Temporary tables, user locks, LOCK TABLES and XA exist only in the server session:
    after a switch such a session gets an error naming them and is closed. Sessions that
    released theirs, or only mentioned a lock in a string, move as usual."""
    setup = ubaton.connect()
    setup.cursor().execute("CREATE TABLE IF NOT EXISTS baton_unplanned.l (a INT)")
    setup.close()
    stuck = {
        "temporary_tables": ["CREATE TEMPORARY TABLE baton_unplanned.tmp1 (a INT)"],
        "user_locks": ["SELECT GET_LOCK('unplanned-lock', 1)"],
        "table_locks": ["LOCK TABLES baton_unplanned.l READ"],
        "xa": ["XA START 'unplanned-xa'", "INSERT INTO baton_unplanned.t (v) VALUES (7)"],
    }
    free = [
        ["SELECT GET_LOCK('unplanned-free', 1)", "SELECT RELEASE_LOCK('unplanned-free')"],
        ["SELECT 'no get_lock(''unplanned-str'', 0) here'"],
        [
            "CREATE TEMPORARY TABLE baton_unplanned.tmp2 (a INT)",
            "DROP TEMPORARY TABLE baton_unplanned.tmp2",
        ],
    ]
    conns: dict[str, pymysql.Connection] = {}
    for name, statements in [*stuck.items(), *((f"free{i}", f) for i, f in enumerate(free))]:
        conns[name] = ubaton.connect()
        with conns[name].cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    result = ubaton.ctl("--json", "prs")
    assert result.returncode == 0, result.stdout + result.stderr
    for name, conn in conns.items():
        with conn.cursor() as cur:
            if name in stuck:
                with pytest.raises(pymysql.MySQLError) as e:
                    cur.execute("SELECT 1")
                assert e.value.args[0] == 1927, e.value
                assert name.replace("_", " ") in e.value.args[1].lower(), e.value
                assert metric(ubaton.scrape(), "baton_sessions_refused_total", reason=name) == 1
            else:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
        conn.close()


def test_commands_for_a_dead_primary_wait_for_the_emergency_reparent_unless_they_wrote(box, ubaton):
    """kill -9 of the primary. A read in flight waits and runs again on the primary that ERS
    establishes; so does an insert sent after the kill (it cannot connect: it never ran). An
    insert in flight may have committed, and its commit may reach the next primary: it is not
    run again, and its client gets 1927 at once. Last in this module: the old primary stays
    down."""
    old = primary(ubaton)
    idle, reader, writer = ubaton.connect(), ubaton.connect(), ubaton.connect()
    with idle.cursor() as cur:
        cur.execute("SELECT 1")  # the session has a backend on the old primary
    read_t, read_out = in_thread(reader, "SELECT SLEEP(3) AS unplanned_read")
    write_t, write_out = in_thread(
        writer, "INSERT INTO baton_unplanned.t (v) SELECT 5 FROM (SELECT SLEEP(3)) s"
    )
    time.sleep(0.5)  # both statements are running on the primary
    pid = next(s["pid"] for s in box.status()["servers"] if s["name"] == old)
    os.kill(pid, signal.SIGKILL)
    write_t.join(5)
    assert write_out.error is not None and write_out.error.args[0] == 1927, write_out
    assert "may or may not have been executed" in write_out.error.args[1]
    time.sleep(0.3)  # the idle session's connection is seen closed
    idle_t, idle_out = in_thread(idle, "INSERT INTO baton_unplanned.t (v) VALUES (3)")
    time.sleep(0.5)
    assert idle_t.is_alive() and read_t.is_alive(), (idle_out, read_out)
    result = ubaton.ctl("--json", "ers")
    assert result.returncode == 0, result.stdout + result.stderr
    idle_t.join(10)
    read_t.join(10)
    assert idle_out.error is None and read_out.error is None, (idle_out, read_out)
    assert read_out.rows == ((0,),)  # SLEEP ran to its end, on the new primary
    new = primary(ubaton)
    assert new != old and count(box, new, 3) == 1
    for cause, outcome, at_least in (
        ("unreachable", "held", 1),
        ("lost", "held", 1),
        ("lost", "passed", 1),
    ):
        assert (
            metric(ubaton.scrape(), "baton_failed_commands_total", cause=cause, outcome=outcome)
            >= at_least
        ), (cause, outcome)
    for conn in (idle, reader, writer):
        conn.close()
