"""Every command Baton relays, against the real sandbox, compared with the server direct where
the answer is deterministic."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from harness.baton import Baton, start_baton
from proxy.packets import Cap, Command, lenenc_bytes
from tests.fixtures import app_conn, app_connector, port_hint
from tests.rawclient import DEFAULT_CAPS, RawClient, split_packets

DB = "baton_cmds"


@pytest.fixture(scope="module", autouse=True)
def schema(primary_port: int, sandbox: object) -> Iterator[None]:
    conn = app_conn(
        primary_port, autocommit=True, client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS
    )
    cur = conn.cursor()
    cur.execute(f"DROP DATABASE IF EXISTS {DB}")
    cur.execute(f"CREATE DATABASE {DB}")
    cur.execute(
        f"CREATE TABLE {DB}.t (id INT PRIMARY KEY, name VARCHAR(20) NOT NULL DEFAULT 'x',"
        " data MEDIUMBLOB)"
    )
    cur.execute(f"INSERT INTO {DB}.t (id, name) VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    cur.execute(f"CREATE PROCEDURE {DB}.two_sets() BEGIN SELECT 1 AS a; SELECT 'b' AS b, 2; END")
    yield
    cur.execute(f"DROP DATABASE {DB}")
    conn.close()


@pytest.fixture(
    params=[DEFAULT_CAPS, DEFAULT_CAPS | Cap.DEPRECATE_EOF], ids=["eof", "deprecate_eof"]
)
def pair(
    request: pytest.FixtureRequest, baton: Baton, primary_port: int
) -> Iterator[tuple[RawClient, RawClient]]:
    direct = RawClient(primary_port, database=DB, caps=request.param)
    proxied = RawClient(baton.port, database=DB, caps=request.param)
    assert direct.logged_in and proxied.logged_in
    yield direct, proxied
    direct.close()
    proxied.close()


def both(pair: tuple[RawClient, RawClient], command: int, body: bytes = b"") -> bytes:
    a, b = (c.command(command, body) for c in pair)
    assert a == b
    return a


def test_query_multi_statements_and_multiple_result_sets(pair: tuple[RawClient, RawClient]) -> None:
    out = both(pair, Command.QUERY, b"SELECT 1; SELECT 2, 3; UPDATE t SET name = name")
    assert len(split_packets(out)) > 6
    out = both(pair, Command.QUERY, f"CALL {DB}.two_sets()".encode())
    assert b"b" in out and pair[1].parser.results == 2


def test_init_db_ping_field_list_statistics_set_option(pair: tuple[RawClient, RawClient]) -> None:
    assert both(pair, Command.INIT_DB, b"baton_test")[4:5] == b"\x00"
    assert both(pair, Command.INIT_DB, b"no_such_db")[4:5] == b"\xff"
    both(pair, Command.INIT_DB, DB.encode())
    assert both(pair, Command.PING)[4:5] == b"\x00"
    fields = both(pair, Command.FIELD_LIST, b"t\x00")
    assert b"name" in fields and b"data" in fields
    assert both(pair, Command.FIELD_LIST, b"nope\x00")[4:5] == b"\xff"
    stats = [c.command(Command.STATISTICS) for c in pair]
    assert all(s[4:].startswith(b"Uptime: ") for s in stats)
    # COM_SET_OPTION: multi-statements off, then a multi-statement query fails, then on again.
    both(pair, Command.SET_OPTION, struct.pack("<H", 1))
    assert both(pair, Command.QUERY, b"SELECT 1; SELECT 2")[4:5] == b"\xff"
    both(pair, Command.SET_OPTION, struct.pack("<H", 0))
    assert both(pair, Command.QUERY, b"SELECT 1; SELECT 2")[4:5] != b"\xff"


def test_unknown_command_is_refused_and_session_goes_on(baton: Baton) -> None:
    c = RawClient(baton.port, database=DB)
    out = c.command(Command.TIME)
    assert c.error(out)[:2] == (1047, "08S01")
    assert c.command(Command.PING)[4:5] == b"\x00"
    c.close()


def test_quit_closes(baton: Baton) -> None:
    c = RawClient(baton.port)
    c.send(bytes((Command.QUIT,)))
    c.sock.settimeout(5)
    assert c.sock.recv(10) == b""


def test_reset_connection_forgets_state(baton: Baton) -> None:
    c = RawClient(baton.port, database=DB)
    c.query("SET @v = 42, SESSION sql_mode = 'ANSI'")
    stmt, _ = c.prepare("SELECT 1")
    assert c.command(Command.RESET_CONNECTION)[4:5] == b"\x00"
    out = c.query("SELECT @v, @@session.sql_mode = @@global.sql_mode, DATABASE()")
    row = split_packets(out)[-2]
    assert row == b"\xfb" + lenenc_bytes(b"1") + lenenc_bytes(DB.encode())
    assert c.error(c.execute(stmt))[0] == 1243
    # Baton still learns state after the reset: its tracking was set again.
    c.query("USE baton_test")
    sessions = {s["id"]: s for s in baton_sessions(baton)}
    assert any(s["schema"] == "baton_test" for s in sessions.values())
    c.close()


def baton_sessions(baton: Baton) -> list[dict]:
    out = baton.ctl("--json", "sessions")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_change_user(baton: Baton) -> None:
    conn = app_connector(baton.port, database=DB)
    cur = conn.cursor()
    cur.execute("SET @x = 1")
    conn.cmd_change_user(username="app", password="app-pass", database="baton_test")
    cur = conn.cursor()
    cur.execute("SELECT @x, DATABASE()")
    assert cur.fetchall() == [(None, "baton_test")]
    with pytest.raises(mysql.connector.Error) as exc:
        conn.cmd_change_user(username="app", password="wrong")
    assert exc.value.errno == 1045
    # As with MariaDB, a refused change leaves the session as it was.
    cur = conn.cursor()
    cur.execute("SELECT CURRENT_USER(), DATABASE()")
    assert cur.fetchall() == [("app@127.0.0.1", "baton_test")]
    # The server decides: the new account is logged in as itself, with its own privileges.
    conn.cmd_change_user(username="reporting", password="reporting-pass", database="sbtest")
    cur = conn.cursor()
    cur.execute("SELECT CURRENT_USER(), DATABASE()")
    assert cur.fetchall() == [("reporting@127.0.0.1", "sbtest")]
    with pytest.raises(mysql.connector.Error) as exc:
        cur.execute("CREATE TABLE sbtest.reporting_may_not (a INT)")
    assert exc.value.errno == 1142
    # One error for a database the account may not use, and the session goes on.
    with pytest.raises(mysql.connector.Error) as exc:
        conn.cmd_change_user(username="app", password="app-pass", database="no_such_db")
    assert exc.value.errno == 1044
    cur = conn.cursor()
    cur.execute("SELECT 1")
    assert cur.fetchall() == [(1,)]
    conn.close()


def test_prepared_statements_long_data_reset_close(baton: Baton, primary_port: int) -> None:
    for port in (primary_port, baton.port):
        conn = app_connector(port, database=DB, autocommit=True)
        cur = conn.cursor(prepared=True)
        blob = bytes(range(256)) * 1000
        # A file-like parameter is sent with COM_STMT_SEND_LONG_DATA.
        cur.execute("UPDATE t SET data = ? WHERE id = ?", (io.BytesIO(blob), 2))
        cur.execute("SELECT data FROM t WHERE id = ?", (2,))
        assert cur.fetchall() == [(blob,)]
        # Executing again resets the statement (COM_STMT_RESET) before the new parameters.
        cur.execute("SELECT data FROM t WHERE id = ?", (1,))
        assert cur.fetchall() == [(None,)]
        cur.close()  # COM_STMT_CLOSE
        conn.close()


def test_statement_ids_are_batons_own(baton: Baton) -> None:
    c = RawClient(baton.port, database=DB)
    ids = [c.prepare("SELECT ?")[0] for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    sessions = baton_sessions(baton)
    mine = next(s for s in sessions if [p["id"] for p in s["prepared_statements"]] == ids)
    assert [p["sql"] for p in mine["prepared_statements"]] == ["SELECT ?"] * 3
    c.command(Command.STMT_CLOSE, struct.pack("<I", ids[1]))
    # An unknown id is refused by Baton, like the server does.
    out = c.execute(ids[1])
    assert c.error(out)[:2] == (1243, "HY000")
    out = c.execute(ids[2], params=b"\x00" + b"\x01" + b"\x08\x00" + struct.pack("<q", 5))
    assert split_packets(out)[-2] == b"\x00\x00" + struct.pack("<q", 5)
    c.close()


def test_cursor_fetch_pages(baton: Baton) -> None:
    c = RawClient(baton.port, database=DB, caps=DEFAULT_CAPS | Cap.DEPRECATE_EOF)
    stmt, _ = c.prepare("SELECT id FROM t ORDER BY id")
    c.execute(stmt, cursor=True)
    first = split_packets(c.fetch(stmt, 2))
    second = split_packets(c.fetch(stmt, 2))
    assert len(first) == 3 and len(second) == 2  # two rows + terminator, one row + terminator
    c.close()


def test_load_data_local_refused_by_default(baton: Baton, tmp_path: Path) -> None:
    f = tmp_path / "rows.csv"
    f.write_text("10,ten\n11,eleven\n")
    conn = baton.connect(database=DB, local_infile=True)
    with pytest.raises(pymysql.err.MySQLError) as exc:
        conn.cursor().execute(
            f"LOAD DATA LOCAL INFILE '{f}' INTO TABLE t FIELDS TERMINATED BY ',' (id, name)"
        )
    assert exc.value.args[0] == 1148
    assert "allow_load_data_local" in exc.value.args[1]
    cur = conn.cursor()
    cur.execute("SELECT COUNT(*) FROM t WHERE id >= 10")
    assert cur.fetchone() == (0,)
    conn.close()


def test_load_data_local_relayed_when_enabled(sandbox: object, tmp_path: Path) -> None:
    b = start_baton(
        sandbox.config_path, tmp_path / "b", port_hint() + 10, proxy={"allow_load_data_local": True}
    )
    try:
        f = tmp_path / "rows.csv"
        f.write_text("".join(f"{i},n{i}\n" for i in range(100, 5100)))
        conn = b.connect(database=DB, local_infile=True)
        cur = conn.cursor()
        cur.execute(
            f"LOAD DATA LOCAL INFILE '{f}' INTO TABLE t FIELDS TERMINATED BY ',' (id, name)"
        )
        assert cur.rowcount == 5000
        cur.execute("SELECT COUNT(*) FROM t WHERE id >= 100")
        assert cur.fetchone() == (5000,)
        cur.execute("DELETE FROM t WHERE id >= 100")
        conn.close()
    finally:
        b.stop()
