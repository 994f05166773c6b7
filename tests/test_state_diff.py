"""The borrow diff (proxy/state_diff.py): only what differs is sent."""

from __future__ import annotations

from proxy.packets import frame
from proxy.session import SessionState
from proxy.state_diff import MAX_STATEMENTS, ConnState, plan, reads_insert_id

ROW = [b"utf8mb4", b"utf8mb4", b"utf8mb4", b"utf8mb4_general_ci"]


def session(**kw: object) -> SessionState:
    s = SessionState(1, "app", "?")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_the_same_state_costs_nothing() -> None:
    conn = ConnState.opened("db", ROW)
    s = session(schema="db")
    p = plan(s, conn, True)
    assert p.round_trips == 0 and not p.unusable
    s.variables["sql_mode"] = "ANSI"
    s.add_statement(1, 7, b"SELECT ?", 1, 1)
    s.last_insert_id = 5
    conn.given_back(s, reset=False, insert_id=True)
    other = session(schema="db", variables={"sql_mode": "ANSI"}, last_insert_id=5)
    other.add_statement(3, 0, b"SELECT ?", 1, 1)
    p = plan(other, conn, True)
    assert p.round_trips == 0 and p.mapped == {3: 7}


def test_differences_become_commands() -> None:
    conn = ConnState.opened("db", ROW)
    a = session(schema="db", variables={"sql_mode": "ANSI", "character_set_client": "latin1"})
    a.add_statement(1, 7, b"SELECT 1", 0, 1)
    conn.given_back(a, reset=False, insert_id=True)
    b = session(schema="other", variables={"time_zone": "+03:00"}, last_insert_id=9)
    b.add_statement(1, 0, b"SELECT 2", 0, 1)
    p = plan(b, conn, True)
    assert p.init_db == "other"
    # The client's character set goes back to the login's, sql_mode to the default.
    assert p.assignments == (
        "SESSION character_set_client = 'utf8mb4'",
        "SESSION sql_mode = DEFAULT",
        "SESSION time_zone = '+03:00'",
        "last_insert_id = 9",
    )
    assert p.prepare == (1,) and p.mapped == {}
    assert p.round_trips == 3


def test_no_schema_cannot_use_a_connection_with_one() -> None:
    assert plan(session(), ConnState.opened("db", ROW), False).unusable
    assert not plan(session(), ConnState.opened(None, ROW), False).unusable


def test_a_reset_forgets_statements_and_too_many_close_the_connection() -> None:
    conn = ConnState.opened("db", ROW)
    s = session(schema="db")
    s.add_statement(1, 7, b"SELECT 1", 0, 1)
    conn.given_back(s, reset=False, insert_id=True)
    s.statements.clear()
    conn.given_back(s, reset=True, insert_id=True)
    assert conn.statements == {}
    for i in range(MAX_STATEMENTS + 1):
        s.add_statement(i, i, b"SELECT %d" % i, 0, 1)
    assert not conn.given_back(s, reset=False, insert_id=True)


def test_last_insert_id_is_restored_only_for_a_statement_that_may_read_it() -> None:
    conn = ConnState.opened("db", ROW)
    s = session(schema="db", last_insert_id=9)
    assert plan(s, conn, False).round_trips == 0
    assert plan(s, conn, True).assignments == ("last_insert_id = 9",)
    assert reads_insert_id(s, frame(b"\x03SELECT LAST_INSERT_ID()", 0))
    assert reads_insert_id(s, frame(b"\x03select @@identity", 0))
    assert reads_insert_id(s, frame(b"\x03CALL p()", 0))
    assert not reads_insert_id(s, frame(b"\x03INSERT INTO t VALUES ()", 0))
    s.add_statement(4, 1, b"SELECT last_insert_id()", 0, 1)
    assert reads_insert_id(s, frame(b"\x17\x04\x00\x00\x00\x00\x01\x00\x00\x00", 0))
    assert not reads_insert_id(s, frame(b"\x17\x04\x00", 0))  # truncated: no statement
    # The connection's value is the session's only once it was restored or set there.
    conn.given_back(s, reset=False, insert_id=False)
    assert conn.last_insert_id == 0
    conn.given_back(s, reset=False, insert_id=True)
    assert conn.last_insert_id == 9
