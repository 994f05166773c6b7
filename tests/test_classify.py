"""The statement classifier: which texts may run on a replica. The table holds the hazards
MaxScale's readwritesplit documents (writes, DDL, transactions' statements, stored procedures,
stored functions and UDFs, EXECUTE of SQL prepared statements, user variables, system
variables, SELECT ... FOR UPDATE / INTO, LAST_INSERT_ID) and MariaDB's own (sequences, lock
functions, executable comments, several statements in one text), each with a reason."""

from __future__ import annotations

import random

import pytest

from proxy.classify import MAX_TEXT, Classifier, Verdict, about_previous, classify

V = Verdict
TABLE: list[tuple[str, Verdict]] = [
    # Plain reads: to a replica.
    ("SELECT c FROM sbtest1 WHERE id=5", V.REPLICA),
    ("select count(*) from t", V.REPLICA),
    ("  /* a comment */ SELECT 1", V.REPLICA),
    ("-- leading\nSELECT 1", V.REPLICA),
    ("# hash\nSELECT 1", V.REPLICA),
    ("(SELECT 1) UNION ALL (SELECT 2)", V.REPLICA),
    ("WITH a AS (SELECT 1 AS x) SELECT x FROM a", V.REPLICA),
    ("WITH RECURSIVE r AS (SELECT 1 UNION SELECT 2) SELECT * FROM r", V.REPLICA),
    ("SELECT DISTINCT c FROM sbtest1 WHERE id BETWEEN 1 AND 100 ORDER BY c", V.REPLICA),
    ("SELECT SUM(k) FROM sbtest1 WHERE id BETWEEN 1 AND 100", V.REPLICA),
    ("SELECT 'for update ; @x into' AS s", V.REPLICA),  # words inside a literal
    ("SELECT \"it's\" , 'a''b'", V.REPLICA),
    ("SELECT `update`, `lock` FROM t", V.REPLICA),  # quoted names
    ("SELECT t.update FROM t", V.REPLICA),  # a column after a dot
    ("SELECT 1;", V.REPLICA),  # a trailing semicolon is one statement
    ("SELECT CONCAT(a, UPPER(b)), IFNULL(c, 0), NOW() FROM t", V.REPLICA),
    ("SELECT * FROM a LEFT JOIN (SELECT 1 AS x) d ON d.x = a.x", V.REPLICA),
    ("SELECT 1e5, 0x1F, 3.14", V.REPLICA),
    # Writes, DDL, transactions, session statements: not a read.
    ("INSERT INTO t VALUES (1)", V.NOT_A_READ),
    ("UPDATE t SET a = 1", V.NOT_A_READ),
    ("DELETE FROM t", V.NOT_A_READ),
    ("REPLACE INTO t VALUES (1)", V.NOT_A_READ),
    ("CREATE TABLE t (a int)", V.NOT_A_READ),
    ("CREATE TEMPORARY TABLE t (a int)", V.NOT_A_READ),
    ("DROP TABLE t", V.NOT_A_READ),
    ("BEGIN", V.NOT_A_READ),
    ("START TRANSACTION READ ONLY", V.NOT_A_READ),
    ("COMMIT", V.NOT_A_READ),
    ("SET NAMES utf8mb4", V.NOT_A_READ),
    ("SET @a = 1", V.NOT_A_READ),
    ("USE db", V.NOT_A_READ),
    ("CALL p()", V.NOT_A_READ),  # stored procedure
    ("EXECUTE stmt", V.NOT_A_READ),  # SQL prepared statement
    ("PREPARE s FROM 'SELECT 1'", V.NOT_A_READ),
    ("DO GET_LOCK('a', 1)", V.NOT_A_READ),
    ("LOCK TABLES t READ", V.NOT_A_READ),
    ("HANDLER t OPEN", V.NOT_A_READ),
    ("SHOW TABLES", V.NOT_A_READ),
    ("SHOW WARNINGS", V.NOT_A_READ),
    ("LOAD DATA LOCAL INFILE 'f' INTO TABLE t", V.NOT_A_READ),
    ("VALUES (1)", V.NOT_A_READ),
    ("select_x FROM t", V.NOT_A_READ),
    ("", V.NOT_A_READ),
    ("   ", V.NOT_A_READ),
    # Several statements in one text.
    ("SELECT 1; DROP TABLE t", V.MULTI_STATEMENT),
    ("SELECT 1;SELECT 2", V.MULTI_STATEMENT),
    # Locking reads.
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE", V.LOCKING),
    ("SELECT * FROM t FOR UPDATE SKIP LOCKED", V.LOCKING),
    ("SELECT * FROM t LOCK IN SHARE MODE", V.LOCKING),
    # SELECT ... INTO.
    ("SELECT 1 INTO @x", V.INTO),
    ("SELECT a INTO OUTFILE '/tmp/f' FROM t", V.INTO),
    ("SELECT a FROM t INTO DUMPFILE '/tmp/f'", V.INTO),
    # Variables: user (read or assigned) and system.
    ("SELECT @a", V.VARIABLES),
    ("SELECT @a := 1", V.VARIABLES),
    ("SELECT @@last_insert_id", V.VARIABLES),
    ("SELECT @@warning_count", V.VARIABLES),
    ("SELECT @@session.sql_mode", V.VARIABLES),
    # Sequences.
    ("SELECT NEXTVAL(s)", V.SEQUENCE),
    ("SELECT NEXT VALUE FOR s", V.SEQUENCE),
    ("SELECT PREVIOUS VALUE FOR s", V.SEQUENCE),
    ("SELECT LASTVAL(s)", V.SEQUENCE),
    ("SELECT SETVAL(s, 10)", V.SEQUENCE),
    # Functions: stored, UDF, and built-ins bound to the primary connection.
    ("SELECT f(1)", V.FUNCTION),
    ("SELECT db.f(1)", V.FUNCTION),
    ("SELECT my_udf(a) FROM t", V.FUNCTION),
    ("SELECT LAST_INSERT_ID()", V.FUNCTION),
    ("SELECT last_insert_id ( )", V.FUNCTION),
    ("SELECT FOUND_ROWS()", V.FUNCTION),
    ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1", V.FUNCTION),
    ("SELECT ROW_COUNT()", V.FUNCTION),
    ("SELECT CONNECTION_ID()", V.FUNCTION),
    ("SELECT GET_LOCK('a', 1)", V.FUNCTION),
    ("SELECT RELEASE_LOCK('a')", V.FUNCTION),
    ("SELECT IS_USED_LOCK('a')", V.FUNCTION),
    ("SELECT MASTER_GTID_WAIT('0-1-1')", V.FUNCTION),
    ("SELECT LOAD_FILE('/etc/passwd')", V.FUNCTION),
    ("SELECT SLEEP(1)", V.FUNCTION),
    ("SELECT * FROM t PROCEDURE ANALYSE()", V.FUNCTION),
    # Executable comments may hold anything.
    ("SELECT /*!50000 SQL_CALC_FOUND_ROWS */ 1", V.EXECUTABLE_COMMENT),
    ("SELECT 1 /*M! FOR UPDATE */", V.EXECUTABLE_COMMENT),
    ("/*!40101 SET NAMES utf8 */", V.NOT_A_READ),
    # Per-server tables.
    ("SELECT * FROM information_schema.processlist", V.SYSTEM_SCHEMA),
    ("SELECT * FROM mysql.user", V.SYSTEM_SCHEMA),
    ("SELECT * FROM performance_schema.threads", V.SYSTEM_SCHEMA),
    # Not understood: unterminated literals and comments.
    ("SELECT 'abc", V.UNPARSED),
    ('SELECT "abc', V.UNPARSED),
    ("SELECT `abc", V.UNPARSED),
    ("SELECT 1 /* open", V.UNPARSED),
]


@pytest.mark.parametrize(("sql", "verdict"), TABLE)
def test_table(sql: str, verdict: Verdict) -> None:
    assert classify(sql.encode()) is verdict


def test_offset_is_honoured() -> None:
    raw = b"\x00\x00\x00\x00\x03SELECT 1"
    assert classify(raw, 5) is V.REPLICA
    assert classify(b"\x00\x00\x00\x00\x03DELETE FROM t", 5) is V.NOT_A_READ


def test_too_long_is_not_scanned() -> None:
    sql = b"SELECT " + b"1+" * MAX_TEXT + b"1"
    assert classify(sql) is V.UNPARSED


def test_total_on_random_bytes_and_truncations() -> None:
    """Every input gets a verdict (no exception), and no truncation of a locking read, a
    write or a read with a variable is ever sent to a replica unless it is itself a read."""
    rng = random.Random(7)
    for _ in range(3000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        assert isinstance(classify(b"SELECT " + data), Verdict)
        assert isinstance(classify(data), Verdict)
    for sql, _ in TABLE:
        raw = sql.encode()
        for cut in range(len(raw) + 1):
            assert isinstance(classify(raw[:cut]), Verdict)


def test_cache_is_bounded_and_agrees() -> None:
    c = Classifier(entries=8, longest=32)
    for i in range(100):
        assert c(f"SELECT {i}".encode()) is V.REPLICA
    assert len(c) == 8
    assert c(b"SELECT 1 FOR UPDATE") is V.LOCKING
    assert len(c) == 8
    long = b"SELECT " + b"x" * 100
    assert c(long) is V.REPLICA
    assert len(c) == 8  # too long to keep: not cached
    raw = b"\x00\x00\x00\x00\x03SELECT @a"
    assert c(raw, 5) is V.VARIABLES


@pytest.mark.parametrize(
    ("sql", "about"),
    [
        ("SHOW WARNINGS", True),
        ("show errors;", True),
        ("SHOW COUNT(*) WARNINGS", True),
        ("SHOW WARNINGS LIMIT 2, 5", True),
        ("SELECT @@warning_count", True),
        ("select @@session.error_count ;", True),
        ("SHOW WARNINGS; DROP TABLE t", False),
        ("SELECT @@warning_count, @@x", False),
        ("SHOW TABLES", False),
        ("SHOW WARNINGS LIMIT " + "9" * 300, False),  # bounded: too long
    ],
)
def test_statements_about_the_previous_one(sql: str, about: bool) -> None:
    assert about_previous(sql.encode()) is about
    assert classify(sql.encode()) is not V.REPLICA  # not reads of their own
