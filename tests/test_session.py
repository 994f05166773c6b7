"""Session-state pieces that need no server: restore SQL and re-bound prepared statements."""

from __future__ import annotations

import struct

from proxy.session import PreparedStatement, SessionState, Unmovable


def execute(stmt: int, params: bytes, bound: bool, types: bytes = b"") -> bytes:
    head = b"\x17" + struct.pack("<IBI", stmt, 0, 1)
    return head + b"\x00" + (b"\x01" + types if bound else b"\x00") + params


def test_execute_gets_its_types_again_after_a_re_prepare() -> None:
    s = PreparedStatement(client_id=1, backend_id=70, sql=b"SELECT ?", params=1, columns=1)
    types = b"\x08\x00"
    first = s.execute_payload(execute(1, b"\x05" + b"\x00" * 7, True, types))
    assert first == execute(70, b"\x05" + b"\x00" * 7, True, types)
    again = s.execute_payload(execute(1, b"\x06" + b"\x00" * 7, False))
    assert again == execute(70, b"\x06" + b"\x00" * 7, False)
    s.backend_id, s.rebound = 71, False  # prepared again on a new server
    moved = s.execute_payload(execute(1, b"\x07" + b"\x00" * 7, False))
    assert moved == execute(71, b"\x07" + b"\x00" * 7, True, types)
    later = s.execute_payload(execute(1, b"\x08" + b"\x00" * 7, False))
    assert later == execute(71, b"\x08" + b"\x00" * 7, False)


def test_statement_without_parameters_only_changes_its_id() -> None:
    s = PreparedStatement(client_id=3, backend_id=9, sql=b"SELECT 1", params=0, columns=1)
    payload = b"\x17" + struct.pack("<IBI", 3, 0, 1)
    assert s.execute_payload(payload) == b"\x17" + struct.pack("<IBI", 9, 0, 1)


def test_restore_assignments_order_and_quoting() -> None:
    state = SessionState(1, "app", "127.0.0.1:1")
    state.variables.update(
        {
            "sql_mode": "ANSI_QUOTES",
            "collation_connection": "latin1_german1_ci",
            "character_set_client": "latin1",
            "wait_timeout": "1234",
            "time_zone": "it's",
        }
    )
    state.read_back(
        [
            [b"n", b"42", b"INT", b"latin1"],
            [b"d", b"1500", b"DOUBLE", b"latin1"],
            [b"u", b"7", b"INT UNSIGNED", b"latin1"],
            [b"s", b"x", b"VARCHAR", b"utf8mb4"],
            [None, b"latin1_german1_ci", None, None],
        ]
    )
    state.exact_strings([b"C3A9"])
    assert state.restore_assignments() == [
        "SESSION character_set_client = 'latin1'",
        "SESSION collation_connection = 'latin1_german1_ci'",
        "SESSION sql_mode = 'ANSI_QUOTES'",
        "SESSION time_zone = 'it\\'s'",
        "SESSION wait_timeout = 1234",
        "@`n` = 42",
        "@`d` = 1500e0",
        "@`u` = CAST(7 AS UNSIGNED)",
        "@`s` = CONVERT(X'c3a9' USING utf8mb4)",
    ]


def state() -> SessionState:
    s = SessionState(1, "app", "127.0.0.1:1")
    s.schema = "shop"
    return s


def test_temporary_tables_behind_comments_and_in_multi_statements() -> None:
    s = state()
    s.after_statement(b"/* tag */ -- x\n CREATE TEMPORARY TABLE t1 (a INT)", 0, True, 0)
    s.after_statement(b"SELECT 1; # c\n create temporary table `other`.t2 (a int)", 0, True, 0)
    assert s.temporary_tables == {"shop.t1", "other.t2"}
    s.after_statement(b"DROP TEMPORARY TABLE t1; SELECT 'drop table other.t2'", 0, True, 0)
    assert s.temporary_tables == {"other.t2"}
    # `/*! ... */` is code, not a comment: what follows it is not a statement start.
    s.after_statement(b"/*!40101 SET NAMES utf8 */", 0, True, 0)
    assert s.temporary_tables == {"other.t2"}


def test_get_lock_in_a_prepared_statement_is_seen_at_execute() -> None:
    s = state()
    s.after_statement(b"SELECT GET_LOCK('job', 0)", 0, False, 0)
    assert s.user_locks == {"job"}


def test_sql_level_prepared_statements_are_kept_by_text() -> None:
    s = state()
    s.after_statement(b"PREPARE q FROM 'SELECT ''it''''s'', \\'x\\\\n\\''", 0, False, 0)
    assert s.sql_prepared == {"q": b"SELECT 'it''s', 'x\\n'"}
    s.after_statement(b'prepare `Two` from "CREATE TEMPORARY TABLE tt (a INT)"', 0, False, 0)
    assert s.sql_prepared["two"] == b"CREATE TEMPORARY TABLE tt (a INT)"
    s.after_statement(b"EXECUTE two", 0, True, 0)  # its text is screened like a query
    assert s.temporary_tables == {"shop.tt"}
    assert s.restore_sql_prepared()[0] == "PREPARE `q` FROM X'" + s.sql_prepared["q"].hex() + "'"
    s.after_statement(b"DEALLOCATE PREPARE q", 0, False, 0)
    s.after_statement(b"PREPARE v FROM @text", 0, False, 0)
    assert s.sql_prepared == {"two": s.sql_prepared["two"], "v": None}
    assert s.unmovable()[Unmovable.SQL_PREPARED] == ["v"]


def test_last_insert_id_from_ok_packets_and_read_back() -> None:
    s = state()
    s.after_statement(b"INSERT INTO t VALUES ()", 0, False, 42)
    s.after_statement(b"UPDATE t SET a = 1", 0, False, 0)  # does not reset it
    assert s.last_insert_id == 42 and "last_insert_id = 42" in s.restore_assignments()
    s.after_statement(b"SELECT LAST_INSERT_ID(7)", 0, False, 0)
    assert s.last_insert_id_stale
    assert s.unmovable(lost=True)[Unmovable.USER_VARIABLES] == ["LAST_INSERT_ID()"]
    assert Unmovable.USER_VARIABLES not in s.unmovable(lost=False)
    s.read_back([[None, b"utf8mb4_general_ci", None, None], [None, b"7", b"LAST_INSERT_ID", None]])
    assert s.last_insert_id == 7 and not s.last_insert_id_stale


def test_user_variables_are_stale_only_after_a_statement_that_may_set_them() -> None:
    s = state()
    s.after_statement(b"SET sql_mode = 'ANSI', @@session.time_zone = '+01:00'", 0, True, 0)
    assert not s.user_variables_stale
    s.after_statement(b"SELECT @x := 5", 0, True, 0)
    assert s.user_variables_stale
    assert Unmovable.USER_VARIABLES in s.unmovable(lost=True)


def test_session_tracking_changed_by_the_client() -> None:
    s = state()
    assert s.after_statement(b"SET session_track_schema = 0", 0, True, 0)
    assert not s.variables_untracked  # it changed nothing else: retrack is enough
    assert s.after_statement(
        b"SET SESSION session_track_system_variables = '', sql_mode = 'ANSI'", 0, True, 0
    )
    assert s.variables_untracked
    assert Unmovable.UNTRACKED_VARIABLES in s.unmovable()
    assert not state().after_statement(b"SELECT 1", 0, False, 0)


def test_stored_routines_are_judged_by_their_bodies() -> None:
    from proxy.session import routine_hazards

    s = state()
    s.after_statement(b"CALL fill()", 0, True, 0)
    s.after_statement(b"call `other`.`plain`(1)", 0, True, 0)
    assert s.routines == {"shop.fill", "other.plain"}
    assert s.user_variables_stale  # a routine may set them
    unknown = s.unmovable()[Unmovable.ROUTINE_STATE]
    assert len(unknown) == 2 and "not read" in unknown[0]
    bodies = {
        "shop.fill": routine_hazards(b"BEGIN CREATE TEMPORARY TABLE x (a INT); END"),
        "other.plain": routine_hazards(b"BEGIN SET @v = 1; SELECT @v; END"),
    }
    assert s.unmovable(routines=bodies)[Unmovable.ROUTINE_STATE] == ["shop.fill: temporary tables"]
    s.reset(None)
    assert not s.routines and not s.unmovable()
