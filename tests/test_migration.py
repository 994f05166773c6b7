"""A session's state moves to a new server connection: what a reparent will rely on."""

from __future__ import annotations

import json
import re

from harness.baton import Baton
from harness.clients import admin_conn
from tests.fixtures import app_connector


def backend_id(cur: object) -> int:
    cur.execute("SELECT CONNECTION_ID()")  # type: ignore[attr-defined]
    return cur.fetchall()[0][0]  # type: ignore[attr-defined]


def test_lost_idle_backend_is_replaced_with_the_session_state(
    baton: Baton, primary_port: int
) -> None:
    conn = app_connector(baton.port, autocommit=True)
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
    # Baton reads back what tracking does not report (done before a reparent demotes).
    assert baton.ctl("--json", "sessions").returncode == 0
    old = backend_id(cur)
    admin = admin_conn(primary_port)
    admin.cursor().execute(f"KILL {old}")
    admin.close()

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
    assert re.search(r'^baton_sessions_moved_total\{outcome="moved"\} [1-9]', baton.scrape(), re.M)
    sessions = json.loads(baton.ctl("--json", "sessions").stdout)
    assert any(s["user_variables"].get("i") == "42" for s in sessions)
    cur.execute("DROP DATABASE baton_migr")
    conn.close()
