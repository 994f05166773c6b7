"""What a borrowed server connection must be told so that it carries one session's state: a
pure diff between the session's record and what Baton knows of the connection.

A pooled connection's state is tracked, not reset: when a session gives a connection back,
the connection is known to hold exactly that session's schema, tracked variables,
LAST_INSERT_ID() and prepared statements (nothing that pins is ever given back: see
proxy/pinning.py). The next borrower is given only what differs: a COM_INIT_DB when the schema
differs, one SET for the variables that differ (a variable the borrower never changed goes
back to the login's value: the character sets as read when the connection was opened, the rest
to DEFAULT), and a COM_STMT_PREPARE only for statement texts the connection has not prepared
yet; statements it already has are mapped to their ids. Sessions of one account that run the
same statements therefore borrow with no round trip at all, where COM_RESET_CONNECTION would
cost one per return and the connection would lose its prepared statements (measured in the
README).

The connection's prepared statements stay on it after their session closed them (another
borrower may use the same text); `MAX_STATEMENTS` bounds them: a connection holding more is
closed instead of given back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.client_packets import ClientPacketError, check_stmt_header
from proxy.packets import Command
from proxy.session import CHARSET_VARIABLES, SessionState, system_assignments

MAX_STATEMENTS = 256  # prepared statements a pooled connection may hold

# A statement that may read LAST_INSERT_ID() (a routine may too): only then is the session's
# value restored on a borrowed connection. Restoring it always would cost a round trip on most
# borrows, since every INSERT changes it.
_READS_INSERT_ID = re.compile(rb"(?i)last_insert_id|identity|\bcall\b")
_QUERY, _EXECUTE = int(Command.QUERY), int(Command.STMT_EXECUTE)


def reads_insert_id(state: SessionState, raw: bytes) -> bool:
    """Might this command (a whole client packet) read LAST_INSERT_ID()?"""
    if len(raw) < 5:
        return False
    if raw[4] == _QUERY:
        return _READS_INSERT_ID.search(raw, 5) is not None
    if raw[4] == _EXECUTE:
        try:
            stmt = state.statements.get(check_stmt_header(raw[4:]))
        except ClientPacketError:
            return False
        return stmt is not None and _READS_INSERT_ID.search(stmt.sql) is not None
    return False


# Read once per new pooled connection: its character sets as its login left them.
BASELINE_SQL = "SELECT " + ", ".join(f"@@{n}" for n in CHARSET_VARIABLES)


@dataclass(slots=True)
class ConnState:
    """What a pooled connection holds: as its login left it, then as its last borrower."""

    schema: str | None
    baseline: dict[str, str]  # the character sets after login (BASELINE_SQL)
    variables: dict[str, str] = field(default_factory=dict)  # tracked, as the session knows them
    last_insert_id: int = 0
    statements: dict[bytes, int] = field(default_factory=dict)  # text -> the server's id

    @classmethod
    def opened(cls, schema: str | None, row: list[bytes | None]) -> ConnState:
        baseline = {
            n: v.decode() for n, v in zip(CHARSET_VARIABLES, row, strict=True) if v is not None
        }
        return cls(schema, baseline)

    def given_back(self, state: SessionState, reset: bool, insert_id: bool) -> bool:
        """The borrower is done: the connection now holds its state. `reset`: it ran
        COM_RESET_CONNECTION, so the server forgot the prepared statements; `insert_id`: the
        server's LAST_INSERT_ID() is the session's (restored, or set by its INSERT). False
        when the connection holds too many statements to be kept."""
        if reset:
            self.statements.clear()
            self.last_insert_id = 0
        self.schema = state.schema
        self.variables = dict(state.variables)
        if insert_id:
            self.last_insert_id = state.last_insert_id
        for stmt in state.statements.values():
            self.statements[stmt.sql] = stmt.backend_id
        return len(self.statements) <= MAX_STATEMENTS


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send a borrowed connection before the session's command, in this order."""

    init_db: str | None  # COM_INIT_DB
    assignments: tuple[str, ...]  # one SET
    mapped: dict[int, int]  # client statement id -> the connection's id, already prepared
    prepare: tuple[int, ...]  # client statement ids whose text it must prepare
    unusable: bool = False  # the session has no schema and the connection has one

    @property
    def round_trips(self) -> int:
        return (self.init_db is not None) + bool(self.assignments) + len(self.prepare)


def plan(state: SessionState, conn: ConnState, insert_id: bool) -> Plan:
    """What differs between the session and the connection, as commands to send. `insert_id`:
    the command may read LAST_INSERT_ID(), so the session's value is restored too."""
    unusable = state.schema is None and conn.schema is not None
    init_db = state.schema if state.schema is not None and state.schema != conn.schema else None
    wanted: dict[str, str | None] = {}
    for name in conn.variables.keys() | state.variables.keys():
        now = conn.variables.get(name, conn.baseline.get(name))
        target = state.variables.get(name, conn.baseline.get(name))
        if now != target:
            wanted[name] = target  # None: the server's default
    assignments = system_assignments(wanted)
    if insert_id and state.last_insert_id != conn.last_insert_id:
        assignments.append(f"last_insert_id = {state.last_insert_id}")
    mapped: dict[int, int] = {}
    prepare: list[int] = []
    for client_id, stmt in state.statements.items():
        backend_id = conn.statements.get(stmt.sql)
        if backend_id is None:
            prepare.append(client_id)
        else:
            mapped[client_id] = backend_id
    return Plan(init_db, tuple(assignments), mapped, tuple(prepare), unusable)
