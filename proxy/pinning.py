"""When a session may give its server connection back between commands: the rules, as data.

With `[pool] multiplex = true` a session holds a server connection only while it needs one:
it borrows one from its account's pool for a command and gives it back when the command is
over, unless something of the session lives only in that server session. Each rule below names
such a state (`Pin`); while any holds, the session keeps its connection (it is *pinned*, as
ProxySQL turns multiplexing off per session), and it gives the connection back after the first
command that leaves it free of them all. A pinned session's connection is never lent to anyone
else; a free session's state is restored on whatever connection it borrows next
(proxy/state_diff.py), so the connection it gets back carries nothing of it that it did not
mean to keep.

What is *not* a pin, because Baton restores it on the next connection: the schema, session
variables reported by session tracking (character set, sql_mode, autocommit, time zone, ...),
LAST_INSERT_ID() as the last OK reported it, and prepared statements made with COM_STMT_PREPARE
(re-prepared by their text, their ids mapped).

Everything here is pure: `pins` reads the session's record (proxy/session.py) and the few facts
about the last response that the record does not keep (`Pending`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.packets import Command, Status
from proxy.session import SessionState

_IN_TRANS = int(Status.IN_TRANS)
_CURSOR_EXISTS = int(Status.CURSOR_EXISTS)
_LAST_ROW_SENT = int(Status.LAST_ROW_SENT)


class Pin(enum.StrEnum):
    """Why a session keeps its server connection; a metrics label."""

    TRANSACTION = "transaction"
    TEMPORARY_TABLES = "temporary_tables"
    USER_LOCKS = "user_locks"
    TABLE_LOCKS = "table_locks"
    XA = "xa"
    USER_VARIABLES = "user_variables"
    SQL_PREPARED = "sql_prepared"
    UNTRACKED_VARIABLES = "untracked_variables"
    ROUTINES = "routines"
    CURSOR = "cursor"
    LONG_DATA = "long_data"
    DIAGNOSTICS = "diagnostics"


@dataclass(slots=True)
class Pending:
    """What the last responses left on the connection that the session record does not keep:
    open cursors (by the client's statement id), parameters sent with COM_STMT_SEND_LONG_DATA
    and not yet executed, and the last statement's diagnostics (warnings, FOUND_ROWS()) that
    the next statement may read."""

    cursors: set[int] = field(default_factory=set)
    long_data: set[int] = field(default_factory=set)
    diagnostics: bool = False

    def note(self, command: int, stmt_id: int, status: int, warnings: int, sql: bytes) -> None:
        """One command's response has passed (`stmt_id`: the client's, for COM_STMT_*;
        `warnings`: its warnings and errors, which SHOW WARNINGS / SHOW ERRORS read next;
        `sql`: a query's text, else b"")."""
        if command == _SEND_LONG_DATA:
            self.long_data.add(stmt_id)
            return  # no response: the last statement's diagnostics stay as they were
        if command == _EXECUTE:
            self.long_data.discard(stmt_id)
            if status & _CURSOR_EXISTS:
                self.cursors.add(stmt_id)
            else:
                self.cursors.discard(stmt_id)
        elif command == _FETCH:
            if status & _LAST_ROW_SENT or not status & _CURSOR_EXISTS:
                self.cursors.discard(stmt_id)
        elif command in (_RESET, _CLOSE):
            self.cursors.discard(stmt_id)
            self.long_data.discard(stmt_id)
        elif command == _RESET_CONNECTION:
            self.cursors.clear()
            self.long_data.clear()
        self.diagnostics = warnings > 0 or _FOUND_ROWS.search(sql) is not None


_SEND_LONG_DATA = int(Command.STMT_SEND_LONG_DATA)
_EXECUTE = int(Command.STMT_EXECUTE)
_FETCH = int(Command.STMT_FETCH)
_RESET = int(Command.STMT_RESET)
_CLOSE = int(Command.STMT_CLOSE)
_RESET_CONNECTION = int(Command.RESET_CONNECTION)
_FOUND_ROWS = re.compile(rb"(?i)sql_calc_found_rows")

Routines = dict[str, list[str] | None]


@dataclass(frozen=True, slots=True)
class Rule:
    """A state that pins the session: its name, why it pins, and how it is seen."""

    pin: Pin
    why: str
    holds: Callable[[SessionState, Pending, Routines], bool]


def _routines(state: SessionState, pending: Pending, routines: Routines) -> bool:
    # A routine whose body was read and found harmless pins nothing; one not read (or not
    # yet) may have left anything.
    return any(routines.get(name, None) != [] for name in state.routines)


RULES: tuple[Rule, ...] = (
    Rule(
        Pin.TRANSACTION,
        "a transaction is open: its statements must run on one server session",
        lambda s, p, r: bool(s.status & _IN_TRANS),
    ),
    Rule(
        Pin.TEMPORARY_TABLES,
        "temporary tables exist only in the server session that made them",
        lambda s, p, r: bool(s.temporary_tables),
    ),
    Rule(
        Pin.USER_LOCKS,
        "GET_LOCK locks belong to the server session that took them",
        lambda s, p, r: bool(s.user_locks),
    ),
    Rule(
        Pin.TABLE_LOCKS,
        "LOCK TABLES holds until UNLOCK TABLES in the same server session",
        lambda s, p, r: s.transaction_state[7:8] == "L",
    ),
    Rule(Pin.XA, "an XA transaction is bound to its server session", lambda s, p, r: s.xa),
    Rule(
        Pin.USER_VARIABLES,
        "user variables are not reported by session tracking; restoring them per borrow "
        "would cost a read back and a SET each time, so the session keeps its connection",
        lambda s, p, r: bool(s.user_variables) or s.user_variables_stale or s.last_insert_id_stale,
    ),
    Rule(
        Pin.SQL_PREPARED,
        "SQL-level PREPARE statements live in the server session",
        lambda s, p, r: bool(s.sql_prepared),
    ),
    Rule(
        Pin.UNTRACKED_VARIABLES,
        "the client changed session tracking: what it changed meanwhile is not known",
        lambda s, p, r: s.variables_untracked,
    ),
    Rule(
        Pin.ROUTINES,
        "a stored routine it called may have left state behind (not read, or found hazards)",
        _routines,
    ),
    Rule(
        Pin.CURSOR,
        "an open cursor is fetched from the server session that opened it",
        lambda s, p, r: bool(p.cursors),
    ),
    Rule(
        Pin.LONG_DATA,
        "parameters sent with COM_STMT_SEND_LONG_DATA wait in the server session",
        lambda s, p, r: bool(p.long_data),
    ),
    Rule(
        Pin.DIAGNOSTICS,
        "the last statement's warnings, error or FOUND_ROWS() may be read by the next one",
        lambda s, p, r: p.diagnostics,
    ),
)


def pins(state: SessionState, pending: Pending, routines: Routines) -> list[Pin]:
    """Every rule that holds now: empty when the session may give its connection back."""
    return [rule.pin for rule in RULES if rule.holds(state, pending, routines)]


def pinned(state: SessionState, pending: Pending, routines: Routines) -> bool:
    """Does any rule hold? (The common case, a free session, runs every rule once.)"""
    return any(rule.holds(state, pending, routines) for rule in RULES)
