"""Nothing of a session is silently lost when it moves: each kind of state a client can observe
is carried to the new primary, or the session gets 1927 naming it. Checked after a planned
switch (PRS: Baton reads back what tracking does not report, while the old primary answers)
and after a lost connection (kill -9 of the primary, then ERS: what Baton had not read back is
gone with the server, and the session is refused by name instead of going on without it)."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mysql.connector
import pytest

from harness.baton import Baton, start_baton
from reparent.sandbox import Sandbox
from tests.fixtures import app_connector, port_hint, private_sandbox

DB = "baton_moves"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "moves-sandbox")


@pytest.fixture(scope="module")
def mbaton(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(
        box.config_path,
        tmp_path_factory.mktemp("moves-baton"),
        port_hint() + 130,
        controller={"grace": 1.0},
        detector={"enabled": False},  # the tests switch by hand
    )
    try:
        conn = b.connect()
        cur = conn.cursor()
        for sql in (
            f"CREATE DATABASE IF NOT EXISTS {DB}",
            f"CREATE TABLE IF NOT EXISTS {DB}.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)",
            f"CREATE OR REPLACE PROCEDURE {DB}.take_lock() DO GET_LOCK('moves-r', 0)",
            f"CREATE OR REPLACE PROCEDURE {DB}.make_temp() CREATE TEMPORARY TABLE {DB}.rt (a INT)",
            f"CREATE OR REPLACE PROCEDURE {DB}.set_var() SET @from_routine = 'r'",
        ):
            cur.execute(sql)
        conn.close()
        yield b
    finally:
        b.stop()


@dataclass
class Kind:
    """One kind of session state: how a session gets it, and what it reads after a move (or
    the words of the 1927 that refuses it)."""

    setup: list[str]
    check: str
    expect: tuple[object, ...] | None = None  # the row the check reads, if it moves
    refused: str = ""  # words in the 1927's message, if it cannot move
    prepared: list[str] = field(default_factory=list)  # run as server-side prepared statements


def kinds(lost: bool) -> dict[str, Kind]:
    """After a lost connection, what Baton had not read back from the server is refused."""
    stale = "user variables set since Baton last read them"
    return {
        "schema_and_variables": Kind(
            [f"USE {DB}", "SET sql_mode = 'ANSI', time_zone = '+01:00', NAMES latin1"],
            "SELECT DATABASE(), @@sql_mode, @@time_zone, @@character_set_client",
            (DB, "REAL_AS_FLOAT,PIPES_AS_CONCAT,ANSI_QUOTES,IGNORE_SPACE,ANSI", "+01:00", "latin1"),
        ),
        "user_variables": Kind(
            ["SET @a = 'x', @n = 7"],
            "SELECT @a, @n",
            None if lost else ("x", 7),
            stale if lost else "",
        ),
        "sql_prepared": Kind(["PREPARE q FROM 'SELECT 40 + ?'"], "EXECUTE q USING 2", (42,)),
        "sql_prepared_from_variable": Kind(
            ["SET @text = 'SELECT 1'", "PREPARE qv FROM @text"],
            "EXECUTE qv",
            refused="prepared statements made from a user variable",
        ),
        "last_insert_id": Kind(
            [f"INSERT INTO {DB}.t (v) VALUES (1)", f"UPDATE {DB}.t SET v = 2 WHERE id < 0"],
            "SELECT LAST_INSERT_ID() > 0",
            (1,),
        ),
        "last_insert_id_expression": Kind(
            ["SELECT LAST_INSERT_ID(99)"],
            "SELECT LAST_INSERT_ID()",
            None if lost else (99,),
            "LAST_INSERT_ID()" if lost else "",
        ),
        "temporary_table_behind_a_comment": Kind(
            [f"/* made by an ORM */ CREATE TEMPORARY TABLE {DB}.tmp_c (a INT)"],
            "SELECT 1",
            refused="temporary tables",
        ),
        "temporary_table_prepared": Kind(
            [],
            "SELECT 1",
            refused="temporary tables",
            prepared=[f"CREATE TEMPORARY TABLE {DB}.tmp_p (a INT)"],
        ),
        "user_lock_prepared": Kind(
            [], "SELECT 1", refused="user locks", prepared=["SELECT GET_LOCK('moves-p', 0)"]
        ),
        "user_lock_in_routine": Kind(
            [f"CALL {DB}.take_lock()"], "SELECT 1", refused=f"{DB}.take_lock: user locks"
        ),
        "temporary_table_in_routine": Kind(
            [f"CALL {DB}.make_temp()"], "SELECT 1", refused=f"{DB}.make_temp: temporary tables"
        ),
        "routine_setting_a_variable": Kind(
            [f"CALL {DB}.set_var()"],
            "SELECT @from_routine",
            None if lost else ("r",),
            stale if lost else "",
        ),
        "tracking_turned_off": Kind(
            ["SET session_track_system_variables = '', sql_mode = 'ANSI'"],
            "SELECT 1",
            refused="variables changed while it had session tracking off",
        ),
    }


def backend_id(cur: Any) -> int:
    cur.execute("SELECT CONNECTION_ID()")
    return cur.fetchall()[0][0]


def primary(b: Baton) -> str:
    return json.loads(b.ctl("--json", "status").stdout)["shards"][0]["primary"]


Session = mysql.connector.MySQLConnection


def connect(b: Baton) -> Session:
    return mysql.connector.connect(
        host="127.0.0.1",
        port=b.port,
        user="app",
        password="app-pass",
        use_pure=True,
        autocommit=True,
        ssl_disabled=True,
    )


Checked = tuple[Session, Any, Kind]  # the connection, a cursor made before the move, the kind


def sessions(b: Baton, lost: bool) -> dict[str, Checked]:
    out = {}
    for name, kind in kinds(lost).items():
        conn = connect(b)
        cur = conn.cursor()
        for sql in kind.setup:
            cur.execute(sql)
            cur.fetchall()
        for sql in kind.prepared:
            prepared = conn.cursor(prepared=True)  # COM_STMT_PREPARE, COM_STMT_EXECUTE
            prepared.execute(sql)
            prepared.fetchall()
        # connector/python's cursor() pings first: made now, so the check's own statement is
        # the first command after the move.
        out[name] = (conn, conn.cursor(), kind)
    return out


def check(conns: dict[str, Checked]) -> dict[str, str]:
    """Each session's check; the mismatches, by kind."""
    wrong = {}
    for name, (conn, cur, kind) in conns.items():
        try:
            cur.execute(kind.check)
            row = cur.fetchone()
        except mysql.connector.Error as e:
            if not kind.refused or e.errno != 1927 or kind.refused not in e.msg:
                wrong[name] = f"error {e.errno} {e.msg}"
            continue
        if kind.refused:
            wrong[name] = f"moved, but should have been refused ({row})"
        elif row != kind.expect:
            wrong[name] = f"read {row}, expected {kind.expect}"
        conn.close()
    return wrong


def test_each_kind_of_state_after_a_planned_switch(mbaton: Baton) -> None:
    conns = sessions(mbaton, lost=False)
    before = primary(mbaton)
    result = mbaton.ctl("--json", "prs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert primary(mbaton) != before
    assert check(conns) == {}


def test_values_keep_their_exact_types_and_bytes_across_a_switch(mbaton: Baton) -> None:
    """Variables, the collation after SET NAMES ... COLLATE, user variables of every type
    (read back with their types and exact bytes) and a server-side prepared statement."""
    conn = app_connector(mbaton.port, autocommit=True)
    cur = conn.cursor()
    cur.execute("CREATE DATABASE IF NOT EXISTS baton_migr")
    cur.execute("USE baton_migr")
    cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES,NO_ZERO_DATE', time_zone = '+03:00'")
    cur.execute("SET SESSION wait_timeout = 1234, max_join_size = 99999")
    cur.execute("SET NAMES latin1 COLLATE latin1_german1_ci")
    cur.execute(
        "SET @i = 42, @r = 1.5e3, @d = 3.25, @s = CONVERT(X'68c3a9' USING utf8mb4),"
        " @b = X'00ff27', @n = NULL, @q = 'it''s \\\\ here', @u = 18446744073709551615"
    )
    prepared = conn.cursor(prepared=True)
    prepared.execute("SELECT ? * 2", (21,))
    assert prepared.fetchall() == [(42,)]
    old = backend_id(cur)
    result = mbaton.ctl("--json", "prs")
    assert result.returncode == 0, result.stdout + result.stderr

    cur.execute(
        "SELECT DATABASE(), @@sql_mode, @@time_zone, @@wait_timeout, @@max_join_size,"
        " @@character_set_client, @@collation_connection"
    )
    assert cur.fetchall() == [
        (
            "baton_migr",
            "ANSI_QUOTES,NO_ZERO_DATE",
            "+03:00",
            1234,
            99999,
            "latin1",
            "latin1_german1_ci",
        )
    ]
    assert backend_id(cur) != old
    cur.execute("SELECT @i, @r, @d, HEX(@s), CHARSET(@s), HEX(@b), @n, @q, @u")
    row = cur.fetchall()[0]
    assert row[0] == 42 and float(row[1]) == 1500.0 and str(row[2]).startswith("3.25")
    assert row[3:] == ("68C3A9", "utf8mb4", "00FF27", None, "it's \\ here", 18446744073709551615)
    cur.execute("SELECT VARIABLE_NAME, VARIABLE_TYPE FROM information_schema.USER_VARIABLES")
    assert dict(cur.fetchall()) == {
        "i": "INT",
        "r": "DOUBLE",
        "d": "DECIMAL",
        "s": "VARCHAR",
        "b": "VARCHAR",
        "n": "VARCHAR",
        "q": "VARCHAR",
        "u": "INT UNSIGNED",
    }
    prepared.execute("SELECT ? * 2", (50,))
    assert prepared.fetchall() == [(100,)]
    assert re.search(r'^baton_sessions_moved_total\{outcome="moved"\} [1-9]', mbaton.scrape(), re.M)
    sessions = json.loads(mbaton.ctl("--json", "sessions").stdout)
    assert any(s["user_variables"].get("i") == "42" for s in sessions)
    cur.execute("DROP DATABASE baton_migr")
    conn.close()


def test_each_kind_of_state_after_a_lost_connection(box: Sandbox, mbaton: Baton) -> None:
    """Last in this module: the old primary stays down."""
    conns = sessions(mbaton, lost=True)
    old = primary(mbaton)
    pid = next(s["pid"] for s in box.status()["servers"] if s["name"] == old)
    os.kill(pid, signal.SIGKILL)
    result = mbaton.ctl("--json", "ers")
    assert result.returncode == 0, result.stdout + result.stderr
    assert check(conns) == {}
