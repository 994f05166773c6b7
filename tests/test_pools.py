"""Sessions sharing server connections ([pool] multiplex), against the shared sandbox: many
sessions on a pool of two, state that never leaks from one session to another, every pinning
state keeping its connection (and nobody else getting it), prepared statements mapped by text,
and a full pool answering 1040 without running the statement."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pymysql
import pytest

from harness.baton import Baton, start_baton
from reparent.sandbox import Sandbox
from tests.fixtures import app_connector, port_hint

DB = "baton_pools"
POOL = {"multiplex": True, "max": 2, "queue": 64, "wait_timeout": 1.0}


@pytest.fixture(scope="module")
def pbaton(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(
        sandbox.config_path,
        tmp_path_factory.mktemp("pools-baton"),
        port_hint() + 160,
        extra={"pool": POOL},
    )
    try:
        with b.connect() as conn:
            cur = conn.cursor()
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {DB}")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {DB}.t (id INT PRIMARY KEY, v INT)")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {DB}.ai (id INT AUTO_INCREMENT PRIMARY KEY)")
        yield b
    finally:
        b.stop()


def one(conn: pymysql.Connection, sql: str) -> object:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    return None if row is None else row[0]


def pools(b: Baton) -> dict[str, object]:
    out = b.ctl("--json", "pools")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_many_sessions_share_two_connections(pbaton: Baton) -> None:
    conns = [pbaton.connect(database=DB) for _ in range(40)]
    try:
        ids = set()
        for _ in range(3):
            for c in conns:
                ids.add(one(c, "SELECT CONNECTION_ID()"))
        assert len(ids) <= 2, ids
        # From forty threads at once: still at most two server connections.
        seen: set[object] = set()
        errors: list[BaseException] = []

        def run(c: pymysql.Connection) -> None:
            try:
                for _ in range(20):
                    seen.add(one(c, "SELECT CONNECTION_ID()"))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(seen) <= 2, seen
        state = pools(pbaton)
        assert state["detached"] >= 40
        (pool,) = [p for p in state["pools"] if p["user"] == "app"]
        assert pool["idle"] + pool["lent"] + pool["opening"] <= 2
    finally:
        for c in conns:
            c.close()


def test_state_never_leaks_between_sessions(pbaton: Baton) -> None:
    a, b = pbaton.connect(), pbaton.connect()
    try:
        default_mode = one(b, "SELECT @@sql_mode")
        one(a, f"USE {DB}")
        one(a, "SET SESSION sql_mode = 'ANSI_QUOTES', time_zone = '+03:00', NAMES latin1")
        for _ in range(3):
            assert one(b, "SELECT @@sql_mode") == default_mode
            assert one(b, "SELECT @@time_zone") == "SYSTEM"
            assert one(b, "SELECT @@character_set_client") != "latin1"
            assert one(b, "SELECT DATABASE()") is None or one(b, "SELECT DATABASE()") != DB
            assert one(a, "SELECT @@sql_mode") == "ANSI_QUOTES"
            assert one(a, "SELECT @@time_zone") == "+03:00"
            assert one(a, "SELECT @@character_set_client") == "latin1"
            assert one(a, "SELECT DATABASE()") == DB
        # LAST_INSERT_ID() is the session's own, whoever used the connection last.
        one(a, f"INSERT INTO {DB}.ai VALUES ()")
        mine = one(a, "SELECT LAST_INSERT_ID()")
        one(b, f"INSERT INTO {DB}.ai VALUES ()")
        theirs = one(b, "SELECT LAST_INSERT_ID()")
        assert theirs != mine
        assert one(a, "SELECT LAST_INSERT_ID()") == mine
        assert one(b, "SELECT LAST_INSERT_ID()") == theirs
    finally:
        a.close()
        b.close()


# (enter, check that the state is still there: the value it must return, leave)
PINS = {
    "transaction": ("BEGIN", f"SELECT COUNT(*) >= 0 FROM {DB}.t", 1, ["COMMIT"]),
    "temporary_table": (
        f"CREATE TEMPORARY TABLE {DB}.tt (a INT)",
        f"SELECT COUNT(*) FROM {DB}.tt",
        0,
        [f"DROP TEMPORARY TABLE {DB}.tt"],
    ),
    "user_lock": (
        "SELECT GET_LOCK('baton-pools', 0)",
        "SELECT IS_USED_LOCK('baton-pools') = CONNECTION_ID()",
        1,
        ["SELECT RELEASE_LOCK('baton-pools')"],
    ),
    "table_lock": (
        f"LOCK TABLES {DB}.t READ",
        f"SELECT COUNT(*) >= 0 FROM {DB}.t",
        1,
        ["UNLOCK TABLES"],
    ),
    "xa": (
        "XA START 'baton-pools'",
        "SELECT 1",
        1,
        ["XA END 'baton-pools'", "XA ROLLBACK 'baton-pools'"],
    ),
    "user_variable": ("SET @pooled = 42", "SELECT @pooled", 42, []),
    "sql_prepare": (
        "PREPARE pooled FROM 'SELECT 7'",
        "EXECUTE pooled",
        7,
        ["DEALLOCATE PREPARE pooled"],
    ),
    # Its statement returns the connection id (the warning's CAST adds 0): reading it after
    # would clear the warning.
    "warnings": ("SELECT CONNECTION_ID() + CAST('x' AS SIGNED)", "SHOW COUNT(*) WARNINGS", 1, []),
}


@pytest.mark.parametrize("kind", list(PINS))
def test_a_pinned_session_keeps_its_connection(pbaton: Baton, kind: str) -> None:
    enter, check, expected, leave = PINS[kind]
    a = pbaton.connect()
    others = [pbaton.connect() for _ in range(3)]
    try:
        one(a, "SELECT 1")
        entered = one(a, enter)
        mine = entered if kind == "warnings" else one(a, "SELECT CONNECTION_ID()")
        for _ in range(4):
            for o in others:
                # Nobody else is ever given the pinned session's connection.
                assert one(o, "SELECT CONNECTION_ID()") != mine, kind
            if kind == "warnings":
                break  # its pin lasts one statement: the check reads the warning
            assert one(a, "SELECT CONNECTION_ID()") == mine, kind
        assert one(a, check) == expected, kind
        for sql in leave:
            one(a, sql)
    finally:
        a.close()
        for o in others:
            o.close()


def test_prepared_statements_follow_their_session_by_text(pbaton: Baton) -> None:
    a = app_connector(pbaton.port, database=DB, autocommit=True)
    b = app_connector(pbaton.port, database=DB, autocommit=True)
    try:
        ca, cb = a.cursor(prepared=True), b.cursor(prepared=True)
        for i in range(20):
            ca.execute("SELECT ? + 1", (i,))
            assert ca.fetchall() == [(i + 1,)]
            cb.execute("SELECT ? * 2", (i,))
            assert cb.fetchall() == [(i * 2,)]
            cb.execute("SELECT ? + 1", (i * 10,))
            assert cb.fetchall() == [(i * 10 + 1,)]
        ca.close()  # COM_STMT_CLOSE: b's statement of the same text still runs
        cb.execute("SELECT ? + 1", (5,))
        assert cb.fetchall() == [(6,)]
    finally:
        a.close()
        b.close()


def test_a_full_pool_answers_1040_and_the_statement_never_ran(pbaton: Baton) -> None:
    holders = [pbaton.connect(), pbaton.connect()]
    late = pbaton.connect()
    try:
        for h in holders:
            one(h, "BEGIN")  # each pins one of the pool's two connections
            one(h, "SELECT 1")
        started = time.monotonic()
        with pytest.raises(pymysql.err.OperationalError) as e:
            one(late, f"INSERT INTO {DB}.t VALUES (999, 1)")
        waited = time.monotonic() - started
        assert e.value.args[0] == 1040
        assert "pool" in e.value.args[1] and "not executed" in e.value.args[1]
        assert 0.8 < waited < 5.0, waited  # pool.wait_timeout is 1 s
        for h in holders:
            one(h, "COMMIT")
        # The pool has room again; the refused INSERT had not run.
        assert one(late, f"SELECT COUNT(*) FROM {DB}.t WHERE id = 999") == 0
    finally:
        for c in (*holders, late):
            c.close()
