"""Session-state pieces that need no server: restore SQL and re-bound prepared statements."""

from __future__ import annotations

import struct

from proxy.session import PreparedStatement, SessionState


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
