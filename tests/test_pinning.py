"""The pinning rules (proxy/pinning.py) and the session machine's give-back and borrow edges:
a session in each pinning state keeps its connection; a free one gives it back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.packets import Command, Status, frame
from proxy.pinning import RULES, Pending, Pin, pins
from proxy.session import SessionState
from proxy.session_machine import (
    BORROW,
    GIVE_BACK_NEXT,
    NEXT,
    SEND,
    Close,
    CloseReason,
    Do,
    Phase,
    SessionMachine,
    WriteError,
)
from tests.test_session_machine import World

Setup = Callable[[SessionState, Pending, dict[str, list[str] | None]], None]


def _trans(s: SessionState, p: Pending, r: dict[str, list[str] | None]) -> None:
    s.status |= Status.IN_TRANS


def _table_locks(s: SessionState, p: Pending, r: dict[str, list[str] | None]) -> None:
    s.transaction_state = "_______L"


def _routine(s: SessionState, p: Pending, r: dict[str, list[str] | None]) -> None:
    s.routines.add("db.p")
    r["db.p"] = ["temporary tables"]


SETUPS: dict[Pin, Setup] = {
    Pin.TRANSACTION: _trans,
    Pin.TEMPORARY_TABLES: lambda s, p, r: s.temporary_tables.add("db.t"),
    Pin.USER_LOCKS: lambda s, p, r: s.user_locks.add("l"),
    Pin.TABLE_LOCKS: _table_locks,
    Pin.XA: lambda s, p, r: setattr(s, "xa", True),
    Pin.USER_VARIABLES: lambda s, p, r: setattr(s, "user_variables_stale", True),
    Pin.SQL_PREPARED: lambda s, p, r: s.sql_prepared.update(q=b"SELECT 1"),
    Pin.UNTRACKED_VARIABLES: lambda s, p, r: setattr(s, "variables_untracked", True),
    Pin.ROUTINES: _routine,
    Pin.CURSOR: lambda s, p, r: p.cursors.add(1),
    Pin.LONG_DATA: lambda s, p, r: p.long_data.add(1),
    Pin.DIAGNOSTICS: lambda s, p, r: setattr(p, "diagnostics", True),
}


def test_every_rule_has_a_test_and_a_reason() -> None:
    assert set(SETUPS) == set(Pin) == {rule.pin for rule in RULES}
    assert all(rule.why for rule in RULES)


def shared_machine() -> SessionMachine:
    m = SessionMachine(SessionState(1, "app", "?"), World())
    m.shares = True
    m.logged_in()
    assert m.detached  # its login's connection went back to the pool
    assert m.command(QUERY, hold=False, ready=False) is BORROW
    assert m.connected(ready=True) is SEND
    assert m.response_done(retrack=False) is GIVE_BACK_NEXT
    # Its next command borrows again; these tests start from there, with a connection.
    m.command(QUERY, hold=False, ready=False)
    m.connected(ready=True)
    m.response_done(retrack=False)
    m.detached = False
    return m


QUERY = frame(b"\x03SELECT 1", 0)


def test_a_free_session_gives_its_connection_back_and_borrows_for_the_next() -> None:
    m = shared_machine()
    assert m.command(QUERY, hold=False, ready=True) is SEND
    assert m.response_done(retrack=False) is GIVE_BACK_NEXT
    assert m.phase is Phase.IDLE and m.detached
    # Its next command borrows (no connection: not ready), then runs.
    assert m.command(QUERY, hold=False, ready=False) is BORROW
    assert m.phase is Phase.BORROWING
    assert m.connected(ready=True) is SEND
    assert m.phase is Phase.RELAYING and not m.detached


@pytest.mark.parametrize("pin", list(Pin))
def test_a_pinned_session_keeps_its_connection(pin: Pin) -> None:
    m = shared_machine()
    SETUPS[pin](m.state, m.pending, m.world.routines)
    assert pins(m.state, m.pending, m.world.routines) == [pin]
    for _ in range(3):
        assert m.command(QUERY, hold=False, ready=True) is SEND
        assert m.response_done(retrack=False) is NEXT  # no GIVE_BACK
        assert not m.detached
    # After retracking, too.
    m.command(QUERY, hold=False, ready=True)
    assert m.response_done(retrack=True) == (Do.RETRACK,)
    assert m.retracked() is NEXT


def test_a_harmless_routine_does_not_pin() -> None:
    m = shared_machine()
    m.state.routines.add("db.p")
    m.world.routines["db.p"] = []
    m.command(QUERY, hold=False, ready=True)
    assert m.response_done(retrack=False) is GIVE_BACK_NEXT


def test_a_session_not_sharing_never_gives_back() -> None:
    m = SessionMachine(SessionState(1, "app", "?"), World())
    m.logged_in()
    m.command(QUERY, hold=False, ready=True)
    assert m.response_done(retrack=False) is NEXT


def test_leaving_the_pinning_state_gives_the_connection_back() -> None:
    m = shared_machine()
    m.state.status |= Status.IN_TRANS
    m.command(QUERY, hold=False, ready=True)
    assert m.response_done(retrack=False) is NEXT
    m.command(frame(b"\x03COMMIT", 0), hold=False, ready=True)
    m.state.status &= ~Status.IN_TRANS  # the COMMIT's OK
    assert m.response_done(retrack=False) is GIVE_BACK_NEXT


def test_a_session_that_leaves_gives_back_unless_pinned_or_mid_command() -> None:
    m = shared_machine()
    assert m.close(CloseReason.QUIT) == (Do.GIVE_BACK, Close(CloseReason.QUIT))
    m = shared_machine()
    m.state.temporary_tables.add("t")
    assert m.close(CloseReason.GONE) == (Close(CloseReason.GONE),)
    m = shared_machine()
    m.command(QUERY, hold=False, ready=True)
    assert m.close(CloseReason.GONE) == (Close(CloseReason.GONE),)  # its result is in flight
    m = shared_machine()
    m.command(frame(b"\x19\x01\x00\x00\x00", 0), hold=False, ready=True)  # COM_STMT_CLOSE
    assert m.answered() is GIVE_BACK_NEXT


def test_a_free_session_whose_connection_went_stale_borrows_a_pinned_one_connects() -> None:
    m = shared_machine()
    # A switch was published: its connection is stale (not ready), nothing pins it.
    assert m.command(QUERY, hold=False, ready=False) is BORROW
    assert m.phase is Phase.MOVING and m.detached
    m = shared_machine()
    m.state.sql_prepared["p"] = b"SELECT 1"  # pinned: it moves to a connection of its own
    assert m.command(QUERY, hold=False, ready=False) == (Do.CONNECT,)


def test_a_full_pool_answers_and_the_session_stays_detached() -> None:
    m = shared_machine()
    m.command(QUERY, hold=False, ready=True)
    m.response_done(retrack=False)
    assert m.command(QUERY, hold=False, ready=False) is BORROW
    actions = m.borrow_refused(b"1040")
    assert actions == (WriteError(b"1040"), Do.NEXT)
    assert m.phase is Phase.IDLE and m.detached


def test_a_held_detached_session_borrows_when_released() -> None:
    m = shared_machine()
    m.command(QUERY, hold=False, ready=True)
    m.response_done(retrack=False)
    assert m.command(QUERY, hold=True, ready=False) == (Do.HOLD,)
    m.ticket = 7
    assert m.released(ready=False) is BORROW
    assert m.phase is Phase.FLUSHING
    assert m.connected(ready=True) is SEND
    assert m.response_done(retrack=False)[0] is Do.GIVE_BACK


def test_pending_cursors_long_data_and_diagnostics() -> None:
    p = Pending()
    execute, fetch = int(Command.STMT_EXECUTE), int(Command.STMT_FETCH)
    p.note(int(Command.STMT_SEND_LONG_DATA), 4, 0, 0, b"")
    assert p.long_data == {4}
    p.note(execute, 4, int(Status.CURSOR_EXISTS), 0, b"")
    assert p.long_data == set() and p.cursors == {4}
    p.note(fetch, 4, int(Status.CURSOR_EXISTS), 0, b"")
    assert p.cursors == {4}
    p.note(fetch, 4, int(Status.CURSOR_EXISTS | Status.LAST_ROW_SENT), 0, b"")
    assert p.cursors == set()
    p.note(int(Command.QUERY), 0, 0, 1, b"INSERT ...")
    assert p.diagnostics  # a warning the next SHOW WARNINGS reads
    p.note(int(Command.QUERY), 0, 0, 0, b"SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 1")
    assert p.diagnostics
    p.note(int(Command.QUERY), 0, 0, 0, b"SELECT FOUND_ROWS()")
    assert not p.diagnostics
    p.note(execute, 5, int(Status.CURSOR_EXISTS), 0, b"")
    p.note(int(Command.RESET_CONNECTION), 0, 0, 0, b"")
    assert p.cursors == set()
