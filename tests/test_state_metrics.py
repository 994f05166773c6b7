"""Baton knows each session's state (shown by `baton ctl sessions`) and exports its metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import mysql.connector
import pymysql
import pytest

from harness.baton import Baton
from tests.fixtures import app_connector


def sessions(baton: Baton) -> dict[int, dict]:
    out = baton.ctl("--json", "sessions")
    assert out.returncode == 0, out.stderr
    return {s["id"]: s for s in json.loads(out.stdout)}


def session_of(baton: Baton, conn: mysql.connector.MySQLConnection) -> dict:
    """The Baton session whose backend runs this client connection."""
    cur = conn.cursor()
    cur.execute("SET @baton_probe = 1")
    for s in sessions(baton).values():
        if "baton_probe" in s["user_variables"]:
            cur.execute("SET @baton_probe = NULL")
            return s
    raise AssertionError("session not found")


def test_session_state_is_tracked(baton: Baton) -> None:
    conn = app_connector(baton.port, autocommit=True)
    cur = conn.cursor()
    cur.execute("CREATE DATABASE IF NOT EXISTS baton_state")
    cur.execute("USE baton_state")
    cur.execute("SET SESSION sql_mode = 'ANSI_QUOTES', time_zone = '+02:00'")
    cur.execute("SET NAMES latin1 COLLATE latin1_swedish_ci")
    cur.execute("SET @greeting = 'hi', @n = 42")
    cur.execute("SET autocommit = 0")
    cur.execute("BEGIN")
    cur.execute("SELECT 1")
    cur.fetchall()
    prepared = conn.cursor(prepared=True)
    prepared.execute("SELECT ? + 1", (1,))
    prepared.fetchall()

    state = session_of(baton, conn)
    assert state["user"] == "app"
    assert state["schema"] == "baton_state"
    assert state["variables"]["sql_mode"] == "ANSI_QUOTES"
    assert state["variables"]["time_zone"] == "+02:00"
    assert state["variables"]["character_set_client"] == "latin1"
    assert state["variables"]["collation_connection"] == "latin1_swedish_ci"
    assert state["variables"]["autocommit"] == "OFF"
    assert state["autocommit"] is False
    assert state["in_transaction"] is True
    assert state["user_variables"]["greeting"] == "hi"
    assert state["user_variables"]["n"] == "42"
    assert [p["sql"] for p in state["prepared_statements"]] == ["SELECT ? + 1"]

    cur.execute("COMMIT")
    cur.execute("SET autocommit = 1")
    state = session_of(baton, conn)
    assert state["in_transaction"] is False and state["autocommit"] is True
    prepared.close()
    state = session_of(baton, conn)
    assert state["prepared_statements"] == []
    cur.execute("DROP DATABASE baton_state")
    conn.close()


def test_ctl_tables_and_errors(baton: Baton) -> None:
    out = baton.ctl("sessions")
    assert out.returncode == 0 and out.stdout.startswith("ID")
    out = baton.ctl("status")
    assert out.returncode == 0 and "primary db1" in out.stdout
    bad = subprocess.run(
        [
            shutil.which("python3") or "python3",
            "-m",
            "proxy.cli",
            "ctl",
            "--socket",
            "/nonexistent.sock",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0 and "baton ctl:" in bad.stderr


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics(baton: Baton) -> None:
    before = baton.scrape()
    conn = baton.connect()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    with pytest.raises(pymysql.err.ProgrammingError):
        cur.execute("SELECT * FROM baton_test.no_such_table_here")
    with pytest.raises(pymysql.err.OperationalError):
        baton.connect(password="wrong")
    after = baton.scrape()
    assert metric(after, "baton_client_connections_open") >= 1
    assert (
        metric(after, "baton_client_connections_accepted_total")
        >= metric(before, "baton_client_connections_accepted_total") + 2
    )
    assert (
        metric(after, "baton_login_failures_total", 'reason="access_denied"')
        == metric(before, "baton_login_failures_total", 'reason="access_denied"') + 1
    )
    assert (
        metric(after, "baton_commands_total", 'command="query"')
        >= metric(before, "baton_commands_total", 'command="query"') + 2
    )
    assert (
        metric(after, "baton_errors_total", 'code="1146",origin="backend"')
        == metric(before, "baton_errors_total", 'code="1146",origin="backend"') + 1
    )
    assert metric(after, "baton_command_seconds_count") > metric(
        before, "baton_command_seconds_count"
    )
    assert metric(after, "baton_backend_up", 'server="db1"') == 1
    assert metric(after, "baton_backend_connections", 'server="db1"') >= 1
    conn.close()
