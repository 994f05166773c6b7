"""Fidelity matrix: the same statements direct and through Baton give the same values, column
metadata, status flags, affected rows, insert ids, warnings and errors, in the text protocol
(PyMySQL), the binary protocol (connector/python's server-side prepared statements) and as
raw bytes on the wire."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from harness.baton import Baton
from proxy.packets import Cap
from tests.fixtures import app_conn, app_connector
from tests.rawclient import DEFAULT_CAPS, RawClient

DB = "baton_fidelity"
COLUMNS = """
  id INT PRIMARY KEY,
  d DECIMAL(65,30), b BIT(64), bl BLOB, dt DATETIME(6), t TIME(6), j JSON,
  u VARCHAR(40) CHARACTER SET utf8mb4, bu BIGINT UNSIGNED, y YEAR, f FLOAT, db DOUBLE,
  e ENUM('a','b','c'), s SET('x','y','z'), g GEOMETRY, ti TINYINT(1), c CHAR(3) BINARY
"""
VALUES = (
    "(1, '12345678901234567890123456789012345.123456789012345678901234567890',"
    " b'1111111111111111111111111111111111111111111111111111111111111111', %s,"
    " '2024-02-29 23:59:59.999999', '-12:34:56.789012', '{\"a\": [1, 2.5, \"x\", null]}',"
    " 'p\U0001f600 \U0001d11e ok', 18446744073709551615, 2155, 3.14159, 2.718281828459045,"
    " 'b', 'x,z', ST_GeomFromText('POINT(1 2)'), 1, 'abc'),"
    "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    " NULL, NULL),"
    "(3, -0.000000000000000000000000000001, b'0', '', '1000-01-01 00:00:00', '-838:59:59',"
    " '[]', '', 0, 1901, -1.5e-38, -1.7976931348623157e308, 'a', '', "
    " ST_GeomFromText('LINESTRING(0 0,1 1,2 1)'), 0, '')"
)


@pytest.fixture(scope="module")
def table(primary_port: int, sandbox: Any) -> Iterator[None]:
    conn = app_conn(primary_port, autocommit=True, charset="utf8mb4")
    cur = conn.cursor()
    cur.execute(f"CREATE DATABASE IF NOT EXISTS {DB}")
    cur.execute(f"DROP TABLE IF EXISTS {DB}.fid")
    cur.execute(f"CREATE TABLE {DB}.fid ({COLUMNS})")
    cur.execute(f"INSERT INTO {DB}.fid VALUES {VALUES}", (bytes(range(256)),))
    yield
    cur.execute(f"DROP DATABASE {DB}")
    conn.close()


def fields(cur: pymysql.cursors.Cursor) -> list[tuple[Any, ...]]:
    return [
        (
            f.catalog,
            f.db,
            f.table_name,
            f.org_table,
            f.name,
            f.org_name,
            f.charsetnr,
            f.length,
            f.type_code,
            f.flags,
            f.scale,
        )
        for f in cur._result.fields
    ]


QUERIES = [
    f"SELECT * FROM {DB}.fid ORDER BY id",
    f"SELECT id, d * 2, CAST(bu AS CHAR), HEX(bl), JSON_EXTRACT(j, '$.a[1]') FROM {DB}.fid",
    "SELECT NULL, 1.5, -1, 18446744073709551615, X'00FF', _latin1'caf\xe9', NOW(6) > 0",
    f"SELECT COUNT(*), SUM(f), MAX(dt), GROUP_CONCAT(e) FROM {DB}.fid",
]


@pytest.mark.parametrize("sql", QUERIES)
def test_text_protocol_values_and_metadata(
    baton: Baton, primary_port: int, table: None, sql: str
) -> None:
    results = []
    for port in (primary_port, baton.port):
        conn = app_conn(port, autocommit=True, charset="utf8mb4", binary_prefix=True)
        cur = conn.cursor()
        cur.execute(sql)
        results.append(
            (
                cur.fetchall(),
                fields(cur),
                cur.rowcount,
                conn.server_status,
                conn.warning_count if hasattr(conn, "warning_count") else None,
            )
        )
        conn.close()
    assert results[0] == results[1]


def test_blob_keeps_all_256_byte_values(baton: Baton, table: None) -> None:
    conn = baton.connect(charset="utf8mb4")
    cur = conn.cursor()
    cur.execute(f"SELECT bl, u, bu, b FROM {DB}.fid WHERE id = 1")
    bl, u, bu, b = cur.fetchone()
    assert bl == bytes(range(256))
    assert u == "p\U0001f600 \U0001d11e ok"
    assert bu == 18446744073709551615
    assert b == b"\xff" * 8
    conn.close()


def binary_rows(port: int, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
    conn = app_connector(port, charset="utf8mb4", collation="utf8mb4_general_ci")
    cur = conn.cursor(prepared=True)
    cur.execute(sql, params)
    rows = cur.fetchall()
    description = cur.description
    cur.close()
    conn.close()
    return rows, description


# connector/python 26 misparses some rows with many binary columns even direct, so each type is
# checked in its own statement; the raw-bytes test below covers whole rows.
TYPED_COLUMNS = "d b bl dt t j u bu y f db e s g ti c".split()


@pytest.mark.parametrize("column", TYPED_COLUMNS)
def test_binary_protocol_values_and_metadata(
    baton: Baton, primary_port: int, table: None, column: str
) -> None:
    sql = f"SELECT {column} FROM {DB}.fid WHERE id >= ? ORDER BY id"
    assert binary_rows(primary_port, sql, (1,)) == binary_rows(baton.port, sql, (1,))


def test_binary_protocol_parameters(baton: Baton, primary_port: int) -> None:
    sql = "SELECT ?, ?, ?, ?, ?, ?"
    params = (None, 1.25, -7, "\U0001f600", b"\x00\xff", 18446744073709551615)
    assert binary_rows(primary_port, sql, params) == binary_rows(baton.port, sql, params)


STATEMENTS = [
    f"SELECT * FROM {DB}.fid ORDER BY id",
    f"SELECT * FROM {DB}.fid WHERE id = 2",
    "SELECT * FROM no_such_table",
    "SELEC broken",
    "CREATE TEMPORARY TABLE tt (id INT AUTO_INCREMENT PRIMARY KEY, v TINYINT)",
    "INSERT IGNORE INTO tt (v) VALUES (1), (300), (NULL)",
    "UPDATE tt SET v = v + 1",
    "SHOW WARNINGS",
    "BEGIN",
    "INSERT INTO tt (v) VALUES (5)",
    "SELECT @@in_transaction, LAST_INSERT_ID()",
    "ROLLBACK",
    "SELECT 1; SELECT 2, 'two'; DO 3",
    "SELECT 1/0",
    f"SELECT g, ST_AsText(g) FROM {DB}.fid",
]


@pytest.mark.parametrize(
    "caps", [DEFAULT_CAPS, DEFAULT_CAPS | Cap.DEPRECATE_EOF], ids=["eof", "deprecate_eof"]
)
def test_raw_bytes_are_identical(baton: Baton, primary_port: int, table: None, caps: int) -> None:
    """Byte for byte: results, OK packets with affected rows, insert ids, warnings, info and
    status flags, and ERR packets with code, SQLSTATE and message."""
    direct = RawClient(primary_port, database=DB, caps=caps)
    proxied = RawClient(baton.port, database=DB, caps=caps)
    assert direct.logged_in and proxied.logged_in
    for sql in STATEMENTS:
        assert direct.query(sql) == proxied.query(sql), sql
    direct.close()
    proxied.close()


def test_raw_binary_protocol_and_cursor_fetch(baton: Baton, primary_port: int, table: None) -> None:
    """Server-side cursors: EXECUTE opens one, FETCH pages through it; only ids differ."""
    responses = []
    for port in (primary_port, baton.port):
        c = RawClient(port, database=DB, caps=DEFAULT_CAPS | Cap.DEPRECATE_EOF)
        stmt, prep = c.prepare(f"SELECT * FROM {DB}.fid ORDER BY id")
        got = [prep]
        got.append(c.execute(stmt, cursor=True))
        got.append(c.fetch(stmt, 2))
        got.append(c.fetch(stmt, 2))
        got.append(c.command(0x1A, stmt.to_bytes(4, "little")))  # COM_STMT_RESET
        got.append(c.execute(stmt))
        c.command(0x19, stmt.to_bytes(4, "little"))  # COM_STMT_CLOSE: no response
        got.append(c.execute(stmt))  # now unknown: an error naming the handler
        responses.append(got)
        c.close()
    direct, proxied = responses
    assert direct[:-1] == proxied[:-1]
    assert direct[-1][4:7] == proxied[-1][4:7] == b"\xff" + (1243).to_bytes(2, "little")
    assert direct[-1][7:13] == proxied[-1][7:13] == b"#HY000"
